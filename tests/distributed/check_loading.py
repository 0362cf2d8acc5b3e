"""Run under torchrun: the model loaded by `load_sharded` (rank 0 reads, the others receive)
equals the checkpoint loaded by transformers on one process, parameter for parameter and buffer
for buffer, and tied weights stay tied. Prints one JSON line on rank 0."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from treg_train.model import load_causal_lm, load_sharded
from treg_train.state import setup_distributed

path = sys.argv[1]
runtime = setup_distributed()
model = load_sharded(path, runtime.mesh, None)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
buffers = {name: buffer.cpu() for name, buffer in model.named_buffers()}
tied = model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight
if runtime.rank == 0:
    reference = load_causal_lm(path, torch.float32)
    expected = {f"lm.{key}": value for key, value in reference.state_dict().items()}
    expected_buffers = {f"lm.{name}": buffer for name, buffer in reference.named_buffers()}
    report = {
        "same_keys": sorted(full) == sorted(expected),
        "max_param_diff": max(float((full[k] - expected[k]).abs().max()) for k in expected),
        "same_buffer_names": sorted(buffers) == sorted(expected_buffers),
        "max_buffer_diff": max((float((buffers[k] - expected_buffers[k]).abs().max()) for k in expected_buffers),
                               default=0.0),
        "tied": tied,
        "reference_tied": reference.get_output_embeddings().weight is reference.get_input_embeddings().weight,
    }
    print(json.dumps(report), flush=True)
dist.barrier()  # no rank leaves while another still talks to it
dist.destroy_process_group()
# The report is out: leave without the interpreter's teardown, where a gloo thread destroyed late once
# aborted a rank ("terminate called without an active exception") after all the work was done.
sys.stdout.flush()
os._exit(0)
