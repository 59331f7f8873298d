"""The grouped settings of the module read a config the same way (:class:`ddpm_lightning.settings.Setting`)."""

import pytest

from ddpm_lightning.diffusion.schedules import NoiseSchedule
from ddpm_lightning.diffusion.weighting import LossWeightingConfig
from ddpm_lightning.optim import AdamConfig, LRSchedule, RuntimeConfig

pytestmark = pytest.mark.unit
NAMED = [(NoiseSchedule, "cosine"), (LossWeightingConfig, "min_snr"), (LRSchedule, "wsd")]


@pytest.mark.parametrize(("cls", "name"), NAMED)
def test_a_named_setting_reads_itself_a_mapping_none_and_a_bare_name(cls, name):
    setting = cls(name=name)
    assert cls.parse(setting) is setting
    assert cls.parse({"name": name}) == setting == cls.parse(name)
    assert cls.parse(None) == cls()
    assert cls.parse(setting.to_dict()) == setting  # what the hyper-parameters keep reads back


@pytest.mark.parametrize("cls", [AdamConfig, RuntimeConfig])
def test_a_setting_without_a_name_refuses_a_bare_name_naming_its_fields(cls):
    assert cls.parse(None) == cls() == cls.parse(cls().to_dict())
    with pytest.raises(ValueError, match=rf"^{cls.KEY} must be a mapping of \w+, .* got 'fast'$"):
        cls.parse("fast")


def test_a_bad_value_is_named_with_the_setting_the_names_and_the_fields():
    with pytest.raises(ValueError, match=r"^schedule must be a name \(linear, cosine\) or a mapping of name, beta"):
        NoiseSchedule.parse(3)
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'; allowed: linear, cosine"):
        NoiseSchedule.parse("quadratic")
    with pytest.raises(ValueError, match="^loss_weighting: unknown gama; allowed: name, gamma$"):
        LossWeightingConfig.parse({"name": "min_snr", "gama": 5.0})
