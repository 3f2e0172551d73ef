"""`gorgon serve` flags -> EngineConfig fields and ServerConfig (no model is loaded)."""
from __future__ import annotations

import argparse
import threading

import pytest

from engine import EngineConfig
from server.__main__ import engine_kwargs, main, parse_args, parse_bytes


@pytest.mark.parametrize("text, want", [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                        ("1000000", 1_000_000), ("64 kib", 64 << 10), ("3TB", 3 * 10 ** 12)])
def test_sizes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("text", ["", "GiB", "2 GiBs", "-1GiB", "0", "2XB", "1e9"])
def test_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_flags_map_to_engine_config_fields():
    args = parse_args(["--kv-cache-memory", "2GiB", "--block-size", "32", "--max-num-batched-tokens", "512",
                       "--attention-backend", "flash", "--no-prefix-caching", "--max-num-seqs", "4"])
    kwargs = engine_kwargs(args)
    assert kwargs | {"kv_cache_memory": 2 << 30, "block_size": 32, "max_num_batched_tokens": 512,
                     "attention_backend": "flash", "enable_prefix_caching": False, "max_num_seqs": 4} == kwargs
    assert "num_kv_blocks" not in kwargs
    EngineConfig(**kwargs)  # every key is a field


def test_flags_left_out_keep_the_engine_defaults():
    kwargs = engine_kwargs(parse_args([]))
    config, default = EngineConfig(**kwargs), EngineConfig()
    for name in ("block_size", "kv_cache_memory", "num_kv_blocks", "max_num_batched_tokens", "attention_backend",
                 "enable_prefix_caching", "cuda_graphs"):
        assert getattr(config, name) == getattr(default, name)


def test_tokenizer_and_medusa_flags():
    kwargs = engine_kwargs(parse_args(["--tokenizer", "tok", "--skip-tokenizer-init", "--medusa", "heads",
                                       "--medusa-acceptance", "typical", "--medusa-posterior-threshold", "0.2"]))
    assert kwargs | {"tokenizer": "tok", "skip_tokenizer_init": True, "medusa": "heads",
                     "medusa_acceptance": "typical", "medusa_posterior_threshold": 0.2} == kwargs
    assert "medusa_posterior_alpha" not in kwargs
    EngineConfig(**kwargs)
    assert "medusa_acceptance" not in engine_kwargs(parse_args(["--medusa", "none", "--medusa-acceptance", "typical"]))
    kwargs = engine_kwargs(parse_args(["--medusa", "heads", "--medusa-max-batch-size", "2"]))
    assert kwargs["medusa_max_batch_size"] == 2 and EngineConfig(**kwargs).medusa_max_batch_size == 2
    with pytest.raises(ValueError, match="medusa_max_batch_size must be >= 1"):
        EngineConfig(medusa_max_batch_size=0)


def test_chat_template_flag_takes_a_file_or_the_template(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert engine_kwargs(parse_args(["--chat-template", str(tmp_path / "t.jinja")]))["chat_template"] == template
    assert engine_kwargs(parse_args(["--chat-template", template]))["chat_template"] == template
    assert "chat_template" not in engine_kwargs(parse_args([]))
    typed = "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}"  # a \n typed in a shell: a line break
    assert engine_kwargs(parse_args(["--chat-template", typed]))["chat_template"] == typed.replace("\\n", "\n")
    with pytest.raises(SystemExit):  # a mistyped path, not a template that drops every message
        parse_args(["--chat-template", str(tmp_path / "no_such.jinja")])


def test_enforce_eager_turns_the_cuda_graphs_off():
    assert engine_kwargs(parse_args(["--device", "cuda", "--enforce-eager"]))["cuda_graphs"] is False


def test_dequantize_flag():
    assert engine_kwargs(parse_args(["--dequantize"]))["dequantize"] is True
    assert engine_kwargs(parse_args([]))["dequantize"] is False


def test_batch_invariant_flag():
    assert engine_kwargs(parse_args(["--batch-invariant"]))["batch_invariant"] is True
    assert engine_kwargs(parse_args(["--no-batch-invariant"]))["batch_invariant"] is False
    assert "batch_invariant" not in engine_kwargs(parse_args([]))  # the engine's default: where it is cheap


def test_serve_speculates_with_the_models_own_heads_or_predicted_outputs_by_default(tmp_path):
    assert engine_kwargs(parse_args([]))["medusa"] == "auto"  # the shipped model has heads: the playground shows them
    assert "medusa" not in engine_kwargs(parse_args(["--medusa", "none"]))
    # a folder without heads: drafts from predicted outputs alone, which leaves requests without one as they were
    assert engine_kwargs(parse_args(["--model", str(tmp_path)]))["medusa"] == "prediction"
    # on CUDA plain decode replays graphs and tree steps do not: the heads only when asked for
    assert "medusa" not in engine_kwargs(parse_args(["--device", "cuda"]))
    assert engine_kwargs(parse_args(["--device", "cuda", "--medusa", "auto"]))["medusa"] == "auto"


def test_default_chat_template_kwargs_flag():
    assert engine_kwargs(parse_args(["--default-chat-template-kwargs", '{"enable_thinking": false}']))[
        "chat_template_kwargs"] == {"enable_thinking": False}
    for bad in ("[1]", "{"):
        with pytest.raises(SystemExit):
            parse_args(["--default-chat-template-kwargs", bad])
    with pytest.raises(ValueError, match="tools cannot be set there"):
        EngineConfig(chat_template_kwargs={"tools": []})


def test_generate_speculates_as_serve_does():
    """`gorgon generate --medusa none` was refused ("none is not a Medusa heads folder"), and its default was none."""
    from server.flags import medusa_options
    from server.generate_cli import parse_args as generate_args

    for argv in ([], ["--medusa", "none"], ["--medusa", "lookup", "--medusa-ngram-tokens", "3"], ["--device", "cuda"]):
        assert medusa_options(generate_args(argv)) == {name: value for name, value in engine_kwargs(parse_args(argv))
                                                       .items() if name.startswith("medusa")}


def test_kv_cache_fraction_of_available_memory(monkeypatch):
    monkeypatch.setattr("server.__main__.available_memory", lambda device: 8 << 30)
    assert engine_kwargs(parse_args(["--kv-cache-fraction", "0.25"]))["kv_cache_memory"] == 2 << 30
    # every rank keeps its KV heads of every block: on one host's memory, the fraction is shared
    fraction = ["--kv-cache-fraction", "0.5", "--tensor-parallel-size", "4"]
    assert engine_kwargs(parse_args(fraction))["kv_cache_memory"] == 1 << 30
    assert engine_kwargs(parse_args([*fraction, "--device", "cuda"]))["kv_cache_memory"] == 4 << 30
    monkeypatch.setenv("RANK", "0")  # torchrun's rank 0, with one more rank on its host
    for name, value in {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert engine_kwargs(parse_args(fraction))["kv_cache_memory"] == 2 << 30
    assert engine_kwargs(parse_args(["--num-kv-blocks", "100"]))["num_kv_blocks"] == 100
    monkeypatch.setattr("server.__main__.available_memory", lambda device: None)  # an OS that does not tell
    with pytest.raises(ValueError, match="--kv-cache-memory instead"):
        engine_kwargs(parse_args(["--kv-cache-fraction", "0.25"]))


@pytest.mark.parametrize("argv", [["--kv-cache-memory", "1GiB", "--num-kv-blocks", "4"],
                                  ["--kv-cache-fraction", "0.5", "--kv-cache-memory", "1GiB"],
                                  ["--kv-cache-fraction", "1.5"], ["--block-size", "0"],
                                  ["--max-waiting-requests", "-1"], ["--threads", "0"]])
def test_bad_flags_exit_with_a_usage_error(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("GORGON_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "from-flag"]).api_key == "from-flag"
    monkeypatch.delenv("GORGON_API_KEY")
    assert parse_args([]).api_key is None


def test_http_flags():
    args = parse_args(["--max-waiting-requests", "0", "--cors-origins", "https://a.example", "https://b.example",
                       "--threads", "2"])
    assert args.max_waiting_requests == 0 and args.threads == 2
    assert args.cors_origins == ["https://a.example", "https://b.example"]


def test_serve_builds_the_engine_and_app_from_the_flags(tiny_model_dir, monkeypatch):
    served = {}
    monkeypatch.setattr("server.__main__.Server.run",
                        lambda server: served.update(app=server.config.app, port=server.config.port))
    monkeypatch.setattr("torch.set_num_threads", lambda n: served.update(threads=n))
    monkeypatch.setenv("GORGON_API_KEY", "k")
    main(["--model", str(tiny_model_dir), "--num-kv-blocks", "40", "--block-size", "8", "--no-prefix-caching",
          "--max-num-batched-tokens", "64", "--attention-backend", "reference", "--threads", "1",
          "--max-waiting-requests", "3", "--cors-origins", "*", "--port", "9999", "--max-lora-rank", "32",
          "--max-loras", "3"])
    state = served["app"].state.server
    assert state.llm.stats().num_blocks == 40 and state.llm.config.block_size == 8
    assert not state.llm.config.enable_prefix_caching and state.llm.config.max_num_batched_tokens == 64
    assert state.llm.config.attention_backend == "reference" and served["threads"] == 1
    assert state.config.api_key == "k" and state.config.max_waiting_requests == 3
    assert state.config.cors_origins == ["*"] and served["port"] == 9999
    assert (state.llm.config.max_lora_rank, state.llm.config.max_adapters) == (32, 3)
    assert not state.config.loopback_hosts_only  # (its API key guards it)


@pytest.mark.parametrize("host, loopback_only", [("127.0.0.1", True), ("localhost", True), ("0.0.0.0", False)])
def test_a_server_on_a_loopback_address_without_api_key_takes_loopback_hosts_only(
        host, loopback_only, tiny_model_dir, monkeypatch):
    served = {}
    monkeypatch.setattr("server.__main__.Server.run", lambda server: served.update(app=server.config.app))
    monkeypatch.delenv("GORGON_API_KEY", raising=False)
    main(["--model", str(tiny_model_dir), "--num-kv-blocks", "40", "--host", host, "--port", "9997"])
    assert served["app"].state.server.config.loopback_hosts_only == loopback_only


def test_serve_loads_the_model_on_a_thread_that_then_ends(tiny_model_dir, monkeypatch):
    """OpenMP keeps a worker pool for each thread that ran torch's parallel work; with the main thread's
    pool beside the step thread's, libgomp stops spinning on 2 cores and every kernel call waits for its
    workers to wake (3.5x slower decoding): the model must load elsewhere, on a thread that ends."""
    import server.__main__ as serve

    loaded_on = []

    def load(*args):
        loaded_on.append(threading.current_thread())
        return real_load(*args)

    real_load = serve.load_engine
    monkeypatch.setattr(serve, "load_engine", load)
    monkeypatch.setattr("server.__main__.Server.run", lambda server: None)
    main(["--model", str(tiny_model_dir), "--num-kv-blocks", "40", "--attention-backend", "reference"])
    assert loaded_on and loaded_on[0] is not threading.main_thread() and not loaded_on[0].is_alive()


def test_ctrl_c_in_generate_exits_with_130_and_no_traceback(monkeypatch, tiny_model_dir):
    from server import generate_cli

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_cli, "generate", interrupted)
    with pytest.raises(SystemExit) as exit_:
        generate_cli.main(["--model", str(tiny_model_dir), "--max-tokens", "2"])
    assert exit_.value.code == 130


def test_a_port_in_use_or_out_of_range_fails_before_the_model_loads(monkeypatch):
    import socket

    from server import __main__ as serve_main

    monkeypatch.setattr(serve_main, "load_engine", lambda *args: pytest.fail("the model was loaded"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(SystemExit, match="cannot listen on 127.0.0.1:"):
            serve_main.main(["--port", str(taken.getsockname()[1])])
    with pytest.raises(SystemExit):
        parse_args(["--port", "99999"])
    with pytest.raises(SystemExit):  # (torch's own message lists a dozen device types)
        parse_args(["--device", "gpu"])
    assert parse_args(["--device", "cuda:1"]).device == "cuda:1"


def test_a_chat_answer_runs_to_the_end_of_its_turn_unless_told(capsys):
    """gorgon generate --chat without --max-tokens: the answer ends its turn (or the context), not at 128 tokens
    mid-sentence (the default model, which writes Python, runs to the context)."""
    import json

    from server import generate_cli

    generate_cli.main(["--chat", "--prompt", "What is a list?", "--json", "--temperature", "0"])
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop" or len(out["token_ids"]) > generate_cli.MAX_TOKENS
