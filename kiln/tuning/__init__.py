"""Measuring this machine's kernel crossovers: `kiln tune`'s timing (kernel_tune, kquant_tune) and the
engine's one-round run at its first start on an untuned machine (auto_tune). What the engine reads back
(fingerprints, crossovers, the cached file) is kiln.kernels.tune."""
