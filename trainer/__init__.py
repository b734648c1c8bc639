"""The trainer: LoRA SFT of one adapter (trainer/train.py) and the stage driver (trainer/run.py).

    from trainer import train            # train(cfg, run_dir, overwrite=False) -> summary dict

`train` is imported lazily so that `python -m trainer.run --help` does not load torch.
"""


def __getattr__(name):
    if name == "train":
        from .train import train

        return train
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
