"""The hf engine (``serving.generation.HFEngine``): continuous decoding gives what static decoding gives, a request
that arrives mid-decode starts at the next step, a cancelled request frees its slot, a queue bounded in seconds,
adapters and errors.

The model is the tiny preset trained for a few steps on the facts its tokenizer was made from, so that its top
tokens do not tie (greedy outputs of two batch layouts can only be compared on a model with clear winners)."""

import asyncio
import pickle
import time

import pytest
import torch

from cluster.placement import ReplicaResources
from configs.errors import InvalidRequest, NotFound, Overloaded, RagtuneError
from configs.schema.serve import GeneratorConfig
from serving.engine import Engine, load_engine
from serving.generation import Delta, GenRequest, HFEngine, SamplingParams
from serving.ingress import api_error
from tests.serving.test_generation import decoder_with, ids, save_lora

FACTS = [f"What is the capital of Zal{i}? Ophir{i % 7}. Where was Ana born? In Ophir." for i in range(300)]
PROMPTS = ["What is the capital of Zal3?", "Where was Ana born? In", "A much longer question, about Zal1 and Zal2 "
                                                                    "and where Ana was born?", "Zal"]


@pytest.fixture(scope="module")
def reader_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after 40 AdamW steps on the facts (about 2 s)."""
    from models.generators import load_model, load_tokenizer

    torch.manual_seed(0)
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = tok(FACTS[step * 8 % 300:][:8], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("reader") / "reader"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def lora_dir(reader_dir, tmp_path_factory):
    return save_lora(reader_dir, tmp_path_factory.mktemp("qa") / "adapter", 32, ["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def decoder(reader_dir, lora_dir):
    return decoder_with(reader_dir, "qa", lora_dir)


async def collect(engine: Engine, request: GenRequest, rid: str, log: list | None = None,
                  delay: float = 0.0) -> tuple[str, Delta | None]:
    """The request's text and last delta; each delta is appended to ``log`` as (rid, delta) when it arrives."""
    await asyncio.sleep(delay)
    text, last = "", None
    async for d in engine.generate(request, rid):
        text, last = text + d.text, d
        if log is not None:
            log.append((rid, d))
    return text, last


def mixed_requests(tok):
    """Mixed lengths, adapters, a seeded sampled row and a stop sequence."""
    reqs = []
    for i in range(8):
        params = SamplingParams(max_tokens=[3, 40, 9, 25, 5, 33, 14, 20][i],
                                temperature=1.0 if i == 5 else 0.0, seed=7 if i == 5 else None)
        reqs.append(GenRequest(ids(tok, PROMPTS[i % 4]), params, "qa" if i % 3 == 1 else None))
    return reqs


def test_continuous_and_static_decoding_give_the_same_outputs_with_and_without_adapters(decoder):
    tok = decoder.tokenizer
    reqs = mixed_requests(tok)
    full = decoder.generate([reqs[0]])[0].text
    stop = full[2:4]
    reqs.append(GenRequest(reqs[0].prompt_ids, SamplingParams(12, stop=(stop,))))
    alone = [decoder.generate([r])[0] for r in reqs]  # each request decoded by itself

    async def run(mode):
        engine = HFEngine(decoder, mode=mode, max_batch_size=3)
        try:  # staggered arrivals, more requests than slots: in continuous mode rows join and leave mid-decode
            return await asyncio.gather(*(collect(engine, r, str(i), delay=0.01 * i) for i, r in enumerate(reqs)))
        finally:
            await engine.close()

    static, continuous = asyncio.run(run("static")), asyncio.run(run("continuous"))
    assert [t for t, _ in continuous] == [t for t, _ in static] == [a.text for a in alone]
    assert [(d.finish_reason, d.completion_tokens) for _, d in continuous] == \
        [(a.finish_reason, a.completion_tokens) for a in alone]
    assert continuous[-1][1].finish_reason == "stop" and continuous[-1][0] == full[:full.index(stop)]
    assert alone[1].text != decoder.generate([GenRequest(reqs[1].prompt_ids, reqs[1].params)])[0].text  # lora


def test_the_queue_is_bounded_in_seconds_and_a_refusal_is_a_429_that_crosses_ray(decoder):
    tok = decoder.tokenizer
    endless, short = GenRequest(ids(tok, PROMPTS[1]), SamplingParams(400)), GenRequest(ids(tok, PROMPTS[0]),
                                                                                       SamplingParams(5))

    async def run():
        engine = HFEngine(decoder, max_batch_size=1, max_wait_s=0.001)
        try:
            first = engine.generate(short, "a")  # nothing measured yet: queued whatever the bound
            await collect(engine, short, "b")  # now the engine knows its seconds per step and tokens per request
            [d async for d in first]
            stream = engine.generate(endless, "c")
            await anext(stream)  # holds the only slot
            with pytest.raises(Overloaded, match=r"waiting about \d") as refused:
                engine.generate(short, "d")  # one request ahead of it: ~5 steps of ~ms, over 1 ms
            assert "d" not in engine.requests and engine.info().waiting == 0
            engine.max_wait_s = 60.0
            queued = asyncio.create_task(collect(engine, short, "e"))
            await asyncio.sleep(0.05)
            waiting = engine.info().waiting
            await stream.aclose()
            return refused.value, waiting, await asyncio.wait_for(queued, 30)
        finally:
            await engine.close()

    refused, waiting, (_, last) = asyncio.run(run())
    assert waiting == 1 and last.finish_reason == "length"
    back = pickle.loads(pickle.dumps(refused))  # as it crosses from the Generator's replica to the Ingress
    assert isinstance(back, Overloaded) and api_error(back).status == 429 and back.code == "rate_limit_exceeded"


def test_a_request_that_cannot_finish_by_its_deadline_is_refused_at_once_and_one_that_can_runs(decoder):
    tok = decoder.tokenizer
    prompt = ids(tok, PROMPTS[0])

    def short(deadline):
        return GenRequest(prompt, SamplingParams(5), deadline=deadline)

    async def run():
        engine = HFEngine(decoder, max_batch_size=1)  # no bound on the wait itself: only the deadline refuses
        try:
            with pytest.raises(Overloaded, match=r"with 0\.0s left"):
                engine.generate(short(time.time() - 1), "a")  # its caller has stopped waiting
            first = await collect(engine, short(time.time() + 5), "b")  # nothing measured: nothing to refuse on
            with pytest.raises(Overloaded, match=r"would not finish before its deadline: about 0\.0s waiting") as late:
                engine.generate(short(time.time() + 1e-4), "c")  # a free slot, but ~5 steps of decoding left
            stream = engine.generate(GenRequest(ids(tok, PROMPTS[1]), SamplingParams(400)), "d")
            await anext(stream)  # holds the only slot: a request now waits ~5 steps for it, then decodes ~5
            step = engine._decode_s(1)  # one token's decode; the wait is ~5 of them (a request of ~5 tokens ahead)
            with pytest.raises(Overloaded, match=r"about \d+\.\ds waiting for a slot"):
                engine.generate(GenRequest(prompt, SamplingParams(1), deadline=time.time() + 3 * step), "e")
            assert not {"a", "c", "e"} & set(engine.requests) and engine.info().waiting == 0
            queued = asyncio.create_task(collect(engine, short(time.time() + 60), "f"))
            await asyncio.sleep(0.05)
            waiting = engine.info().waiting
            await stream.aclose()
            return first, late.value, waiting, await asyncio.wait_for(queued, 30)
        finally:
            await engine.close()

    (_, first), late, waiting, (_, last) = asyncio.run(run())
    assert first.finish_reason == "length" and waiting == 1 and last.finish_reason == "length"
    assert api_error(late).status == 429


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_request_arriving_mid_decode_starts_before_the_running_batch_ends_only_when_continuous(decoder, mode):
    tok = decoder.tokenizer
    long, short = GenRequest(ids(tok, PROMPTS[2]), SamplingParams(48)), GenRequest(ids(tok, PROMPTS[0]),
                                                                                  SamplingParams(4))
    log: list[tuple[str, Delta]] = []

    async def run():
        engine = HFEngine(decoder, mode=mode, max_batch_size=4)
        try:
            first = asyncio.create_task(collect(engine, long, "long", log))
            while len(log) < 4:  # the long request is decoding
                await asyncio.sleep(0.001)
            out = await asyncio.gather(first, collect(engine, short, "short", log))
            return out, engine.info()
        finally:
            await engine.close()

    [(_, long_last), (_, short_last)], info = asyncio.run(run())
    assert long_last.finish_reason == "length" and long_last.completion_tokens == 48
    assert short_last.completion_tokens == 4
    order = [rid for rid, _ in log]
    short_first, long_end = order.index("short"), len(order) - 1 - order[::-1].index("long")
    if mode == "continuous":  # it joined: its tokens come while the long one decodes, in a batch of 2
        assert short_first < long_end and order[-1] == "long"
        assert max(d.batch for rid, d in log if rid == "short") == 2
    else:  # static: it waits for the whole batch
        assert short_first > long_end
    assert (info.running, info.waiting, info.mode) == (0, 0, mode)


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_cancelled_request_frees_its_slot_for_the_next_waiting_one(decoder, mode):
    tok = decoder.tokenizer
    endless = GenRequest(ids(tok, PROMPTS[1]), SamplingParams(400))
    waiting = GenRequest(ids(tok, PROMPTS[0]), SamplingParams(5))
    want = decoder.generate([waiting])[0].text

    async def run():
        engine = HFEngine(decoder, mode=mode, max_batch_size=1)  # one slot
        try:
            # closed by its client after 2 deltas (what Serve does when the client goes away)
            stream = engine.generate(endless, "a")
            got = [await anext(stream), await anext(stream)]
            queued = asyncio.create_task(collect(engine, waiting, "b"))
            by_id = asyncio.create_task(collect(engine, waiting, "c"))  # cancelled by id while it waits
            await asyncio.sleep(0.05)
            assert engine.info().waiting == 2
            await engine.cancel("c")
            t0 = time.perf_counter()
            await stream.aclose()
            b, c = await asyncio.wait_for(asyncio.gather(queued, by_id), 30)
            return got, b, c, time.perf_counter() - t0, engine.info()
        finally:
            await engine.close()

    got, (text, last), (c_text, c_last), _, info = asyncio.run(run())
    assert all(d.finish_reason is None for d in got)
    assert text == want and last.finish_reason == "length"
    assert (c_text, c_last) == ("", None)  # its stream ended without a delta
    assert (info.running, info.waiting) == (0, 0)


def test_adapters_stay_until_their_requests_end_and_errors_come_before_any_delta(decoder, lora_dir):
    tok = decoder.tokenizer
    req = GenRequest(ids(tok, PROMPTS[2]), SamplingParams(30), "qa")
    want = decoder.generate([req])[0].text

    async def run():
        engine = HFEngine(decoder, max_batch_size=2)
        try:
            with pytest.raises(NotFound, match="not loaded"):
                await anext(engine.generate(GenRequest(req.prompt_ids, req.params, "other"), "x"))
            with pytest.raises(InvalidRequest, match="does not fit the context"):
                await anext(engine.generate(GenRequest(ids(tok, "x " * 600)[: engine.context], req.params), "y"))
            stream = engine.generate(req, "z")
            text = (await anext(stream)).text
            await engine.remove_adapter("qa")  # in use: removed when the request ends
            assert "qa" in engine.info().adapters
            async for d in stream:
                text += d.text
            await asyncio.sleep(0.05)
            gone = "qa" not in engine.info().adapters
            await engine.add_adapter("qa", lora_dir)
            return text, gone
        finally:
            await engine.close()

    text, gone = asyncio.run(run())
    assert text == want and gone


def test_load_engine_builds_the_hf_engine_from_the_config_and_explains_a_missing_vllm(reader_dir):
    cpu = ReplicaResources(num_cpus=1, num_gpus=0, threads=1, device="cpu")
    gpu = ReplicaResources(num_cpus=1, num_gpus=1, threads=1, device="gpu")
    with pytest.raises(RagtuneError, match="vllm extra"):  # a GPU replica where vllm is not installed (here)
        load_engine(GeneratorConfig(model=reader_dir, engine="vllm"), gpu)
    with pytest.raises(RagtuneError, match="vLLM runs only on GPUs"):
        load_engine(GeneratorConfig(model=reader_dir, engine="vllm"), cpu)
    engine = load_engine(GeneratorConfig(model=reader_dir, decoding="static", max_batch_size=3), cpu)
    assert isinstance(engine, HFEngine) and isinstance(engine, Engine)
    info = engine.info()
    assert (info.engine, info.mode, info.max_batch_size, info.device, info.context) == ("hf", "static", 3, "cpu",
                                                                                        512)
    asyncio.run(engine.close())


def test_the_generator_cancels_the_engine_request_when_its_stream_is_closed(reader_dir):
    """What Serve does when the client goes away: it closes the Generator's stream; the engine frees the row."""
    from configs.schema.serve import PromptConfig
    from serving.deployments import Generator
    from serving.schemas import PromptInfo, Step

    cpu = ReplicaResources(num_cpus=1, num_gpus=0, threads=1, device="cpu")
    generator = Generator.func_or_class(GeneratorConfig(model=reader_dir), PromptConfig(), cpu)
    engine = generator.engine
    request = GenRequest(ids(engine.tokenizer, PROMPTS[1]), SamplingParams(400))

    async def run():
        events = generator._events(request, PromptInfo(prompt_tokens=len(request.prompt_ids), citations=[]))
        got = [await anext(events) for _ in range(3)]
        running = engine.info().running
        await events.aclose()
        marked = set(engine.requests) <= engine.cancelled  # cancelled now (or already dropped), not left to decode
        for _ in range(100):  # freed at the next step
            if engine.info().running == 0:
                break
            await asyncio.sleep(0.01)
        after = engine.info()
        await engine.close()
        return got, running, marked, after

    got, running, marked, after = asyncio.run(run())
    assert isinstance(got[0], PromptInfo) and all(isinstance(s, Step) and s.batch == 1 for s in got[1:])
    assert running == 1 and marked and (after.running, after.waiting) == (0, 0) and not engine.requests


def test_a_request_the_engine_refuses_leaves_its_adapter_free_to_unload(reader_dir, lora_dir):
    """The hf engine refuses at the call (a prompt too long here; a queue past its bound alike), before the
    Generator has sent anything: the Generator yields the refusal as a value (Serve logs a traceback for what a
    replica raises), and the adapter the request counted as in use must count it no more."""
    from configs.schema.serve import PromptConfig
    from serving.deployments import Generator
    from serving.schemas import PromptInfo, Refused

    cpu = ReplicaResources(num_cpus=1, num_gpus=0, threads=1, device="cpu")
    generator = Generator.func_or_class(GeneratorConfig(model=reader_dir, adapters={"qa": lora_dir}), PromptConfig(),
                                        cpu)

    async def run():
        await generator._load_adapter("qa")
        too_long = GenRequest(list(range(5, 5 + generator.engine.context)), SamplingParams(4), "qa")
        events = generator._events(too_long, PromptInfo(prompt_tokens=len(too_long.prompt_ids), citations=[]))
        refused = await anext(events)  # refused before the prompt's info is sent: a value, not a raise
        assert isinstance(refused, Refused) and isinstance(refused.error, InvalidRequest)
        assert "does not fit the context" in refused.error.message
        with pytest.raises(StopAsyncIteration):
            await anext(events)  # nothing after it
        in_use = dict(generator.in_use)
        await generator.unload_adapter("qa")
        loaded = generator.engine.info().adapters
        await generator.engine.close()
        return in_use, loaded

    in_use, loaded = asyncio.run(run())
    assert in_use == {"qa": 0} and loaded == []


def test_the_generator_hands_its_callers_deadline_to_the_engine(reader_dir):
    """The Ingress sets a chat's or completion's deadline (time.time() by when it stops waiting) on the input; the
    Generator's request carries it, so a request whose time went to retrieval and the queues is refused at once
    (returned as ``Refused``, which the Ingress raises as a 429)."""
    from configs.schema.serve import PromptConfig
    from serving.deployments import Generator
    from serving.schemas import CompletionInput, Refused

    cpu = ReplicaResources(num_cpus=1, num_gpus=0, threads=1, device="cpu")
    generator = Generator.func_or_class(GeneratorConfig(model=reader_dir), PromptConfig(), cpu)

    async def run():
        try:
            ok = await generator.complete(CompletionInput(PROMPTS[0], SamplingParams(3), deadline=time.time() + 60))
            late = await generator.complete(CompletionInput(PROMPTS[0], SamplingParams(3), deadline=time.time() - 1))
            return ok, late, generator.engine.info()
        finally:
            await generator.engine.close()

    ok, late, info = asyncio.run(run())
    assert ok.completion_tokens == 3 and (info.running, info.waiting) == (0, 0)
    assert isinstance(late, Refused) and isinstance(late.error, Overloaded)
    assert "would not finish before its deadline" in late.error.message and api_error(late.error).status == 429
