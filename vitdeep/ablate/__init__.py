"""`vitdeep ablate`: a grid of training runs (the papers' ablation tables, or your own) run,
resumed and tabulated by one command; the command itself (modes, checks, printing) is
`vitdeep.commands.ablate`.

    grid.py     bundled grids (vitdeep/grids/*.yaml) and grid files → cells, checked options
    cells.py    a cell's folder and state
    run.py      the cells on this machine, resumable, under the DeepSpeed launcher
    launch.py   several cells in one DeepSpeed launch (the ranks' side)
    slurm.py    the cells as a Slurm job array (--emit slurm)
    results.py  results.json / results.md / results.png from the grid's folder (--collect)
"""
