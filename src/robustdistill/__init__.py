"""robustdistill: adversarial robustness distillation (ABSLD, B-MTARD and their baselines).

    import robustdistill as rd

    cfg = rd.load_config("rslad", ["train.epochs=5"])   # a shipped recipe by name, or a YAML file
    print(rd.estimate(cfg).total)                        # seconds the training will take; writes nothing
    run = rd.train(cfg)                                  # the run folder; progress on stderr (progress=False)
    report = rd.evaluate(run, ["eval.attacks=[clean,pgd20,autoattack]"])   # report.json's document
    rd.compare("digits_methods", jobs=2)                 # a shipped grid (or a grid file): the comparison folder
    print(rd.demo())                                     # the tour on the embedded digits: its table

Every function takes what the command of the same name takes (`robustdistill --help`).
"""

from .api import eval_config, evaluate
from .core import __version__
from .studies.demo import run_demo as demo
from .studies.execute import compare_locally as compare
from .training.config import Config, load_config
from .training.estimate import estimate
from .training.loop import train

__all__ = ["Config", "__version__", "compare", "demo", "estimate", "eval_config", "evaluate", "load_config", "train"]
