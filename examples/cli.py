"""The callbacks from a YAML config or the command line, with LightningCLI.

    python examples/cli.py fit --config examples/chaos_probe.yaml
    python examples/cli.py fit --config examples/chaos_probe.yaml --trainer.callbacks.init_args.num_shadows=2
"""

from lightning.pytorch.cli import LightningCLI

from lightning_chaos.demo import DigitsDataModule, MLPClassifier


def main(args=None) -> LightningCLI:
    return LightningCLI(MLPClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
