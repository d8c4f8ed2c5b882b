from vitdeep.cli import run

run()
