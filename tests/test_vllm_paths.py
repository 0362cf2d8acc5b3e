"""Index arithmetic of both vLLM scoring paths, without starting the engine (the flat path runs
for real in test_engine.py; the token-id-rows path needs a GPU with the V2 model runner)."""

import numpy as np
import pytest
import vllm

from treg_data.scorers.vllm_scorer import VLLMScorer, flat_response_logprobs


def test_flat_logprobs_pick_exactly_the_response_positions():
    from vllm.logprobs import FlatLogprobs

    prefix, response = [1, 5, 6], [7, 8]
    flat = FlatLogprobs()
    flat.append(None)  # the first token has no log-prob
    for token, logprob in zip([5, 6, 7, 8], [-1.0, -2.0, -3.0, -4.0]):
        flat.append({token: vllm.logprobs.Logprob(logprob=logprob, rank=1)})
    np.testing.assert_array_equal(flat_response_logprobs(flat, prefix, response), [-3.0, -4.0])
    with pytest.raises(RuntimeError, match="other tokens"):
        flat_response_logprobs(flat, prefix, [7, 9])


def test_token_id_rows_ask_for_one_row_per_response_token():
    scorer = object.__new__(VLLMScorer)
    scorer._sampling_params = vllm.SamplingParams
    prefix, response = [1, 5, 6, 9], [7, 8, 2]
    params = scorer._row_params(prefix, response)
    # vLLM scores rows start .. prompt_len - 2; row i predicts token start + i + 1.
    rows = len(prefix) + len(response) - 1 - params.prompt_logprob_start
    assert rows == len(response) == params.prompt_logprob_token_ids.shape[0]
    predicted = [params.prompt_logprob_start + i + 1 for i in range(rows)]
    sequence = prefix + response
    assert [sequence[p] for p in predicted] == response
    assert params.prompt_logprob_token_ids[:, 0].tolist() == response
    assert params.detokenize is False and params.max_tokens == 1


def test_engine_environment_binds_every_cpu_and_keeps_what_the_user_set(monkeypatch):
    from treg_data.scorers import cpu_engine

    for name in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_engine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_engine, "preload_libraries", lambda: ["/lib/libtcmalloc_minimal.so.4", "/lib/libiomp5.so"])
    settings = cpu_engine.engine_environment(tensor_parallel_size=2)
    assert settings["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/lib/libiomp5.so"
    assert settings["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3" and settings["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert 1 <= int(settings["VLLM_CPU_KVCACHE_SPACE"]) <= 16
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert cpu_engine.engine_environment() == {}
    # Servers keep vLLM's own binding, which leaves a core to its scheduler process.
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(cpu_engine.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in cpu_engine.engine_environment()


def test_data_parallel_engines_split_the_cores_and_the_kv_cache(monkeypatch):
    from treg_data import data_parallel
    from treg_data.scorers import cpu_engine

    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_engine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_engine, "kv_cache_gib", lambda: 8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert data_parallel.worker_environments(2, 1) == [
        {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0,1"},
        {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "2,3"}]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert [env.get("VLLM_CPU_KVCACHE_SPACE") for env in data_parallel.worker_environments(2, 1)] == [None, None]
