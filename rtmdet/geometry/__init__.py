"""Geometry shared by tasks: rotated boxes (rtmdet.geometry.rotated)."""
