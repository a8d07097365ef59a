"""Studies: many runs compared with intervals over seeds and test images.

grid.py      a comparison grid's file, typed and checked, and the runs it stands for
execute.py   running a grid here (`--jobs N`) under the policy every executor shares (`train_run`)
slurm.py     running a grid as SLURM jobs (submitit), requeued and resumed bit for bit
stats.py     hierarchical bootstrap over seeds and images, bias-corrected intervals, paired differences
assemble.py  the comparison report from the run folders alone
render.py    report.md and cells.csv
figures.py   the comparison's figures
demo.py      `robustdistill demo`: the tour on the embedded digits
"""
