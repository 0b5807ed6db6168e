"""examples/char_lm.py on a tiny configuration: every attention flag learns, our dense
attention trains like torch's SDPA, DDP over 2 processes reproduces the single process, and
a resumed run continues exactly where the uninterrupted one would be."""
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("RA_SANITIZED"):
    pytest.skip("the sanitizer job covers the kernels through the NumPy tests; the "
                "framework bridges are left out to keep its time", allow_module_level=True)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"
_spec = importlib.util.spec_from_file_location("char_lm", SCRIPT)
char_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(char_lm)

HAS_LUCIDRAINS = importlib.util.find_spec("routing_transformer") is not None

# 2 layers so gradients pass through one attention into another; 4 heads = 2 local + 2 routing
TINY = ["--layers", "2", "--d-model", "32", "--heads", "4", "--context", "64", "--window", "16",
        "--batch-size", "4", "--lr", "1e-2", "--warmup", "1", "--eval-windows", "4",
        "--eval-every", "0", "--log-every", "1000", "--no-progress", "--threads", "1"]


def run(*flags):
    """char_lm.main in this process on the tiny configuration; returns its record."""
    return char_lm.main(TINY + [str(f) for f in flags])


def max_rel_diff(a, b):
    assert len(a) == len(b), f"{len(a)} values vs {len(b)}"
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("attention", [
    a if a != "rt-lucidrains" else pytest.param(a, marks=pytest.mark.skipif(
        not HAS_LUCIDRAINS, reason="routing-transformer is not installed"))
    for a in char_lm.ATTENTIONS])
def test_every_attention_learns(attention):
    record = run("--attention", attention, "--steps", 8)
    losses = record["losses"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses), f"{attention}: {losses}"
    # from ln 256 = 5.55 nats the byte frequencies alone are learned within a few steps
    assert losses[0] > 5.0, f"{attention}: first loss {losses[0]} (an untrained model: ~5.55)"
    assert max(losses[-3:]) < losses[0] - 1.0, f"{attention}: loss did not decrease: {losses}"
    (final,) = record["evals"]
    assert final["step"] == 8 and 0 < final["val_bpc"] < 7.0, f"{attention}: {final}"
    assert record["tokens_per_second"] > 0 and 0 < record["attention_share"] < 1
    assert record["peak_rss_mib"] > 0


def test_dense_trains_like_sdpa_in_float64():
    """Same model, same seed: our dense attention and torch's SDPA give the same losses
    (forward and gradients end to end; the issue asks 1e-4 relative, float64 gives ~1e-10)."""
    sdpa = run("--attention", "sdpa", "--steps", 5, "--dtype", "float64")["losses"]
    dense = run("--attention", "dense", "--steps", 5, "--dtype", "float64")["losses"]
    assert max_rel_diff(dense, sdpa) < 1e-10, f"dense {dense} vs sdpa {sdpa}"
    assert sdpa[-1] < sdpa[0], f"the comparison must cover training steps: {sdpa}"


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun --nproc-per-node 2 (gloo, loopback) at the same global batch and seed gives
    the single process's loss curve and held-out bits/char."""
    flags = ["--attention", "dense", "--steps", "4", "--eval-every", "2", "--dtype", "float64"]
    single = run(*flags)
    log = tmp_path / "ddp.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun + [str(SCRIPT), "--ddp", *TINY, *flags,
                                      "--log-json", str(log)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ddp = json.loads(log.read_text())
    assert len(ddp["losses"]) == 4
    assert max_rel_diff(ddp["losses"], single["losses"]) < 1e-10, \
        f"ddp {ddp['losses']} vs single {single['losses']}"
    assert [e["step"] for e in ddp["evals"]] == [2, 4]
    assert max_rel_diff([e["val_bpc"] for e in ddp["evals"]],
                        [e["val_bpc"] for e in single["evals"]]) < 1e-10


def test_resume_continues_the_uninterrupted_run(tmp_path):
    """Stopping after 3 steps, saving, and resuming gives steps 4-5 of the uninterrupted run
    bit for bit (routing: the centroid buffer and the optimizer state travel in the file)."""
    flags = ["--attention", "routing", "--steps", 5]
    whole = run(*flags)["losses"]
    ckpt = tmp_path / "ckpt.pt"
    first = run(*flags, "--stop-after", 3, "--ckpt", ckpt)["losses"]
    resumed = run(*flags, "--resume", ckpt)["losses"]
    assert first == whole[:3], f"{first} vs {whole[:3]}"
    assert resumed == whole, f"resumed {resumed} vs uninterrupted {whole}"


def _trained(flags):
    """A tiny float64 model after 3 training steps (so that routing centroids exist and
    have moved), in eval mode, and its arguments."""
    args = char_lm.get_args(TINY + ["--dtype", "float64", *flags])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = char_lm.CharLM(args).double()
    optimizer = char_lm.make_optimizer(model, args)
    train, _, _, _ = char_lm.load_corpus()
    for step in (1, 2, 3):
        loss, aux = model(*char_lm.get_batch(train, step, args))
        (loss + args.aux_weight * aux).backward()
        for m in model.modules():
            if isinstance(m, char_lm.Lucidrains):
                m.update_centroids()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), args


def _future_influence(flags):
    """Largest change of the logits at positions < 45 when bytes 45.. of a held-out window
    are replaced, relative to the largest logit, after 3 float64 training steps (so that
    routing centroids exist and have moved); eval mode.  45 lies inside a local block (16)
    and a Combiner block (8), so a leak inside a block shows too."""
    model, args = _trained(flags)
    _, val, _, _ = char_lm.load_corpus()
    x, _ = char_lm.get_batch(val, 0, args)
    changed = x.clone()
    changed[:, 45:] = torch.randint(0, 256, changed[:, 45:].shape,
                                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model.logits(x)[:, :45], model.logits(changed)[:, :45]
    return ((before - after).abs().max() / before.abs().max()).item()


@pytest.mark.parametrize("flags", [["--attention", a] for a in char_lm.ATTENTIONS
                                   if a not in ("routing", "rt-lucidrains")]
                         + [["--attention", "routing", "--membership", "argmax"],
                            ["--attention", "routing", "--membership", "argmax", "--shared-qk"]],
                         ids=" ".join)
def test_causal_attentions_do_not_see_the_future(flags):
    assert _future_influence(flags) < 1e-10, f"{flags}: later bytes change earlier predictions"


def test_balanced_routing_sees_the_future_as_documented():
    """Balanced membership picks cluster members from the whole window (the paper's scheme,
    documented in char_lm.py): later bytes do change earlier predictions.  If this starts to
    fail, the layer became causal and the example's docs must say so."""
    assert _future_influence(["--attention", "routing"]) > 1e-6


@pytest.mark.parametrize("flags", [["--attention", "sdpa"], ["--attention", "dense"],
                                   ["--attention", "local"],
                                   ["--attention", "routing", "--membership", "argmax"],
                                   ["--attention", "routing", "--membership", "argmax",
                                    "--shared-qk"],
                                   ["--attention", "combiner-fixed", "--block", "8"],
                                   ["--attention", "combiner-axial", "--block", "8"],
                                   ["--attention", "combiner-mixture", "--block", "8"]],
                         ids=" ".join)
def test_decoding_caches_give_the_full_forward_logits(flags):
    """Feeding bytes one at a time through the caches gives, at every position, the logits
    of the whole forward over the bytes so far (float64: to rounding)."""
    model, args = _trained(flags)
    _, val, _, _ = char_lm.load_corpus()
    x = val[:40].long()
    caches = [char_lm.make_cache(b.attn.attend, args) for b in model.blocks]
    with torch.no_grad():
        for t in range(40):
            step = char_lm.next_logits_cached(model, caches, x[t:t + 1], t)
            full = model.logits(x[None, :t + 1])[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{flags} position {t}: {m}")


def test_sample_flag_generates_the_same_text_both_ways():
    record = run("--attention", "local", "--steps", 3, "--sample", 20, "--prompt", "import ")
    gen = record["generation"]
    assert gen["cached"]["text"] == gen["recomputed"]["text"]
    assert gen["cached"]["text"].startswith("import ") and len(gen["cached"]["text"]) == 27
    record = run("--attention", "routing", "--steps", 2, "--sample", 5)
    assert "cached" not in record["generation"], "balanced routing has no decoding cache"


@pytest.mark.parametrize("bias", ["alibi", "t5"])
def test_dense_with_position_bias_trains_like_sdpa(bias):
    """The bias reaches our kernel and SDPA's float mask alike: the same float64 losses, the
    T5 table learned through both (its gradient comes out of the kernel)."""
    flags = ("--steps", 4, "--dtype", "float64", "--position-bias", bias)
    sdpa = run("--attention", "sdpa", *flags)["losses"]
    dense = run("--attention", "dense", *flags)["losses"]
    assert max_rel_diff(dense, sdpa) < 1e-10, f"dense {dense} vs sdpa {sdpa}"


@pytest.mark.parametrize("attention", ["dense", "local", "routing", "combiner-fixed",
                                       "combiner-mixture"])
def test_dropout_and_bias_train(attention):
    record = run("--attention", attention, "--steps", 8, "--attn-dropout", 0.2,
                 "--position-bias", "t5")
    losses = record["losses"]
    assert all(math.isfinite(x) for x in losses) and max(losses[-3:]) < losses[0] - 1.0, losses


@pytest.mark.parametrize("flags", [["--attention", "dense", "--position-bias", "alibi"],
                                   ["--attention", "local", "--position-bias", "t5"],
                                   ["--attention", "routing", "--membership", "argmax",
                                    "--position-bias", "t5", "--attn-dropout", "0.3"],
                                   ["--attention", "combiner-axial", "--block", "8",
                                    "--position-bias", "t5"]],
                         ids=" ".join)
def test_position_bias_keeps_causality(flags):
    assert _future_influence(flags) < 1e-10


def test_methods_without_the_terms_refuse_them():
    with pytest.raises(SystemExit):
        run("--attention", "rt-lucidrains", "--steps", 1, "--attn-dropout", 0.1)
