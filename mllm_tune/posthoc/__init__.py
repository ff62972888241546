"""After training: `merging.py` (WiSE-FT, task arithmetic, TIES, DARE), `dawin.py` (DaWin
coefficients and mixtures), `dawin_decoding.py` (per-sample DaWin decoding on eval sets),
`calibration.py` (logit calibration)."""
