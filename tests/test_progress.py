"""Progress bars count network evaluations, not batches: sampling, the likelihood bound, the demo's report."""

from typing import Any

import pytest
import torch
from helpers import tiny

from ddpm_lightning.callbacks.demo_report import DemoReport
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation import digit_classifier, nll
from ddpm_lightning.sampling import iter_samples

pytestmark = pytest.mark.unit


class Bar:
    """tqdm's interface, recording the bars made and what they counted."""

    made: list["Bar"] = []

    def __init__(self, *args: Any, total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any):
        self.total, self.desc, self.unit, self.disable, self.n = total, desc, unit, kwargs.get("disable", False), 0
        Bar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[Bar]:
    Bar.made = []
    for module in ("ddpm_lightning.sampling", "ddpm_lightning.evaluation.nll", digit_classifier.__name__):
        monkeypatch.setattr(f"{module}.tqdm", Bar)
    return Bar.made


def test_sampling_counts_the_network_evaluations_of_every_batch(bars: list[Bar]) -> None:
    module = tiny()
    heun = SamplerConfig("heun", 3)  # 2N - 1 = 5 evaluations per batch
    batches = list(iter_samples(module, range(5), sampler=heun, batch_size=2, progress=True))
    assert len(batches) == 3
    (bar,) = [b for b in bars if not b.disable]
    assert (bar.unit, bar.total, bar.n) == ("eval", 15, 15) and "5 images (heun5)" in bar.desc


def test_the_bound_counts_its_network_evaluations(bars: list[Bar]) -> None:
    module = tiny()
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    nll.bpd_of_images(module, images, t_samples=3, batch_size=2, progress=True)  # L_0 and 3 KL terms per batch
    (bar,) = [b for b in bars if not b.disable]
    assert (bar.unit, bar.total, bar.n) == ("eval", 8, 8)


def test_the_demo_report_shows_bars_of_its_samples_and_its_classifier(bars: list[Bar]) -> None:
    report = DemoReport(num_samples=2, num_eval_samples=3, sampler=SamplerConfig("ddim", 4))
    report._progress = True  # a run with a progress bar (write_report sets it from the trainer)
    report._eval_samples(tiny(), desc="demo: samples of the trained model")
    (bar,) = [b for b in bars if not b.disable]
    assert bar.desc.startswith("demo: samples of the trained model") and (bar.total, bar.n) == (4, 4)
    images, labels = torch.rand(256, 1, 32, 32) * 2 - 1, torch.arange(256) % 10
    digit_classifier.train_digit_classifier((images, labels), (images[:10], labels[:10]), epochs=1, progress=True)
    assert [(b.unit, b.total, b.n) for b in bars[1:] if not b.disable] == [("step", 2, 2)]
