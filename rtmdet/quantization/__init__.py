"""Quantization-aware training matched to TFLite int8 (onnx2tf + TF's converter).

fakequant.py  TFLite's int8 scheme as fake-quant modules (per-channel weights, calibrated ranges)
model.py      the fake-quant detector: BN folded, fx-traced, quantizers where the .tflite has them
qat.py        the fine-tuning loop (stage-2 pipeline, RTMDetLoss, ranges frozen for the last epochs)
export.py     qat.pt save/load, the calibration images, the int8 TFLite of the QAT weights
inspect.py    fake-quant vs .tflite: scales tensor by tensor, outputs, TFLite's own kernel spread
stage.py      the `qat` DVC stage; compare.py prints float / PTQ / QAT mAP side by side
"""
