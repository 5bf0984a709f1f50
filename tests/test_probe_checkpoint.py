"""A run stopped and resumed from a checkpoint ends with the same d(t) and exponents as an uninterrupted run."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import DropoutMLP, quiet_trainer, random_classification
from lightning_chaos import ChaosProbe


def make_probe(renormalize_every):
    return ChaosProbe(num_shadows=2, renormalize_every=renormalize_every, log_every_n_steps=1)


def loader():
    return DataLoader(random_classification(), batch_size=16, shuffle=False)


def new_model():
    L.seed_everything(3, verbose=False)
    return DropoutMLP(dropout=0.0, optimizer="adam", scheduler="step")


@pytest.mark.parametrize("renormalize_every", [None, 4])
def test_resume_gives_the_same_distances_and_exponents(tmp_path, renormalize_every):
    uninterrupted = make_probe(renormalize_every)
    quiet_trainer(max_epochs=4, callbacks=[uninterrupted]).fit(new_model(), loader())

    first_half = make_probe(renormalize_every)
    trainer = quiet_trainer(max_epochs=2, callbacks=[first_half])
    trainer.fit(new_model(), loader())
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = make_probe(renormalize_every)
    L.seed_everything(99, verbose=False)  # a different initialisation: the checkpoint must win
    quiet_trainer(max_epochs=4, callbacks=[resumed]).fit(DropoutMLP(dropout=0.0, optimizer="adam", scheduler="step"),
                                                         loader(), ckpt_path=checkpoint)

    assert resumed.distances.shape == uninterrupted.distances.shape == (4 * 6 + 1, 2)
    assert torch.equal(resumed.distances, uninterrupted.distances)
    assert torch.equal(resumed.local_exponents, uninterrupted.local_exponents)
    assert resumed.lyapunov_exponent == uninterrupted.lyapunov_exponent


def test_state_dict_is_empty_before_fit_and_loads_back():
    probe = ChaosProbe()
    assert probe.state_dict() == {}
    probe.load_state_dict({})
    assert probe._restored is None


def test_probes_that_differ_only_in_renormalisation_share_a_trainer_and_each_resumes_its_own(tmp_path):
    """Each probe's checkpoint state is keyed by every argument that shapes it, not only ε, K and the seed."""
    free, renormalised = make_probe(None), make_probe(4)
    trainer = quiet_trainer(max_epochs=2, callbacks=[free, renormalised])
    trainer.fit(new_model(), loader())
    checkpoint = tmp_path / "both.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert not torch.equal(free.distances, renormalised.distances)

    free_again, renormalised_again = make_probe(None), make_probe(4)
    quiet_trainer(max_epochs=2, callbacks=[renormalised_again, free_again]).fit(new_model(), loader(),
                                                                                ckpt_path=checkpoint)
    assert torch.equal(free_again.distances, free.distances)
    assert torch.equal(renormalised_again.distances, renormalised.distances)


class ShadowFaultAtStep3(DropoutMLP):
    """A fault in the shadows only, once, at global step 3."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 3 and type(self.trainer) is not L.Trainer:  # a shadow reads the trainer through a view
            raise RuntimeError("a transient fault in a shadow")
        return super().training_step(batch, batch_idx)


def test_a_probe_disabled_by_a_fault_stays_off_when_resumed(tmp_path):
    """Its shadows froze at the fault: resuming them would measure a stale separation as if it were valid."""

    def fit(max_epochs, probe, **kwargs):
        L.seed_everything(3, verbose=False)
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[probe])
        trainer.fit(ShadowFaultAtStep3(dropout=0.0), loader(), **kwargs)
        return trainer

    with pytest.warns(UserWarning, match="The real training continues"):
        trainer = fit(1, first := make_probe(None))
    checkpoint = tmp_path / "faulted.ckpt"
    trainer.save_checkpoint(checkpoint)
    steps_before_the_fault = first.distances.shape[0]

    with pytest.warns(UserWarning, match="disabled by a fault; it stays off"):
        fit(2, resumed := make_probe(None), ckpt_path=checkpoint)
    assert resumed._ensemble is None
    assert torch.equal(resumed.distances, first.distances)  # nothing measured after the fault
    assert steps_before_the_fault < 6 + 1  # an epoch is 6 steps: the probe stopped early
