"""Tensor parallel on torch.distributed: one model sharded over `tensor_parallel_size` processes.

Rank 0 is the engine (scheduler, KV block tables, sampling, detokenization); ranks 1..N-1 hold their
share of every weight and of the KV cache and run the same forward as rank 0, fed by one broadcast of
the step's inputs. The model file knows nothing of this: `sharding` resizes a Llama-family model's
layers from outside before its weights load (Megatron-style: QKV and gate/up split by output rows,
o_proj and down_proj by input columns with one all-reduce each, a vocabulary-parallel embedding and
LM head whose logits are all-gathered), and each layer's `tp_slice` cuts the checkpoint tensors,
dense, GGUF blocks or kiln's quantized buffers, down to its rank's part as they load.

  topology.py  which heads, rows and columns a rank holds; which sizes are valid
  sharding.py  the model transform (layer sizes, hooks for the collectives, the gathered logits)
  slicing.py   one checkpoint tensor → this rank's part (the layer's method says how its tensors lie)
  comm.py      the process group: init (spawned ranks or env://), collectives, failures in words
  runner.py    rank 0's model runner: broadcast the step, forward, gather logits, sample
  worker.py    ranks 1..N-1: load, then run every broadcast step until told to stop
  engine.py    `LLMEngine.from_config` under TP: start the ranks, load, build the engine
"""
