from vitdeep.cli import main

main()
