"""RTMDet models: build_model, the size table and checkpoint loading."""

from rtmdet.models.detector import SIZES, ModelConfig, RTMDet, build_model, model_config

__all__ = ["SIZES", "ModelConfig", "RTMDet", "build_model", "model_config"]
