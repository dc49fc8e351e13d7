"""Calibration: calibration data, observers, RTN / GPTQ / SmoothQuant per expert, layer-by-layer driver."""
