"""rtmdet: RTMDet real-time object detectors in plain PyTorch."""

__version__ = "0.1.0"
