"""Speculative decoding: proposers that guess the next tokens cheaply (proposer.py: the one
interface; ngram_proposer.py, draft_model.py), the adaptive switch-off (controller.py) and the
SpecDecoder that the engine calls once per step (spec_decoder.py). The lossless verification of
the drafts is sampling, so it lives in kiln.sample.rejection_sampler."""
