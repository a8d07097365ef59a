"""Where results live on disk, written so that a crash or a second process loses nothing.

files.py  atomic writes, one writer per folder (`FolderLock`), torch files loaded without running code
runs.py   a run folder's layout, what `--force` may delete, the metrics log, earlier reports kept
evals.py  evaluation folders: chosen, created and locked by one process, removed if nothing was written
"""
