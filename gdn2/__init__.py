"""Gated DeltaNet-2: operators (gdn2.ops), the token mixer (gdn2.layer) and the causal LM (gdn2.modeling)."""
from gdn2.configuration import NAMED_CONFIGS, GDN2Config, named_config
from gdn2.modeling import GDN2Cache, GDN2ForCausalLM, GDN2Model

__all__ = ["GDN2Config", "GDN2Model", "GDN2ForCausalLM", "GDN2Cache", "NAMED_CONFIGS", "named_config", "register"]


def register() -> None:
    """Make AutoConfig / AutoModel / AutoModelForCausalLM resolve model_type "gdn2" to our classes.

    Explicit (not at import) so importing gdn2 changes no global registry. Idempotent; leaves every other
    model_type (fla's included) as it was.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "gdn2" in CONFIG_MAPPING and CONFIG_MAPPING["gdn2"] is not GDN2Config:
        raise RuntimeError(
            f"model_type 'gdn2' is already registered to {CONFIG_MAPPING['gdn2'].__module__}; "
            "refusing to replace another library's registration"
        )
    AutoConfig.register("gdn2", GDN2Config, exist_ok=True)
    AutoModel.register(GDN2Config, GDN2Model, exist_ok=True)
    AutoModelForCausalLM.register(GDN2Config, GDN2ForCausalLM, exist_ok=True)
