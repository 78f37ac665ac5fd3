"""Speculative decoding: proposers that guess the next tokens cheaply, and the lossless
verification that keeps what the target model would have produced."""
