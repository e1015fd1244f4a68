"""RTMDet models: build_model, the size table, CSPNeXt classifiers and checkpoint loading."""

from rtmdet.models.classifier import ClassifierConfig, CSPNeXtClassifier, build_classifier
from rtmdet.models.detector import SIZES, ModelConfig, RTMDet, build_model, model_config

__all__ = ["SIZES", "ClassifierConfig", "CSPNeXtClassifier", "ModelConfig", "RTMDet", "build_classifier",
           "build_model", "model_config"]
