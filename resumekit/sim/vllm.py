"""vLLM's own scheduler and worker-side connector glue, run on the CPU around a fake model.

The test bed of the vLLM connector (tests/test_vllm_connector.py,
benchmarks/bench_vllm.py). What runs is vLLM 0.34's code: its v1 ``Scheduler``
(``vllm/v1/core/sched/scheduler.py``) with the EC connector its factory loads by
``ec_connector_module_path``; per tensor-parallel rank, ``ActiveECConnector.
maybe_get_output`` (``vllm/v1/worker/gpu/ec_connector.py:49-82``) around the
rank's step, or ``no_forward`` on a step with nothing scheduled
(``vllm/v1/worker/gpu/model_runner.py:1855-1860``); ``ECOutputAggregator``
(``vllm/distributed/ec_transfer/ec_connector/utils.py:95-147``) folding the ranks'
outputs, as ``MultiprocExecutor`` does; and ``update_from_output``. What is faked is
what cannot run on a CPU: the model (an encoder output drawn from the item's
identifier, no forward pass; the check that gather_mm_embeddings makes,
``vllm/v1/worker/gpu/mm/encoder_runner.py:277``, is made here) and the worker
processes (every rank's connector lives in this process).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from resumekit.errors import IntegrationUnavailableError, InvalidArgumentError

INSTALL_HINT: Final = "pip install --no-deps vllm==0.34.0 and the pins of requirements/vllm-cpu.txt"
#: Qwen2-VL's special tokens at their real ids (the tokenizer of the tiny model).
_SPECIAL: Final = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def _vllm() -> None:
    try:
        importlib.import_module("vllm")
    except ImportError as error:
        raise IntegrationUnavailableError(
            f"vLLM cannot be imported ({error}): {INSTALL_HINT}"
        ) from None


def write_tiny_model(directory: str | Path, *, hidden_size: int = 64) -> Path:
    """A Qwen2-VL model directory with tiny sizes and no weights (nothing loads them):
    what vLLM needs to build a ``ModelConfig`` offline."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    vocab = {chr(ord("a") + i): i for i in range(26)} | {" ": 26, "<unk>": 27} | _SPECIAL
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    tokenizer.save(str(root / "tokenizer.json"))
    files: dict[str, Any] = {
        "tokenizer_config.json": {
            "tokenizer_class": "Qwen2Tokenizer",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 1 << 20,
        },
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        "config.json": {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "max_position_embeddings": 1 << 20,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "torch_dtype": "float16",
            "tie_word_embeddings": True,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "vision_token_id": 151654,
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_config": {
                "depth": 2,
                "embed_dim": 32,
                "mlp_ratio": 2,
                "num_heads": 2,
                "in_chans": 3,
                "hidden_size": hidden_size,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "spatial_patch_size": 14,
                "temporal_patch_size": 2,
            },
        },
    }
    for name, content in files.items():
        (root / name).write_text(json.dumps(content, indent=1))
    return root


def encoder_output(identifier: str, tokens: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """What the fake encoder computes for an item: drawn from its identifier, so both
    instances (and a test) know the very tensor that must arrive."""
    seed = int.from_bytes(hashlib.blake2b(identifier.encode(), digest_size=8).digest(), "big")
    g = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    return torch.randn(tokens, width, generator=g).to(dtype)


@dataclass(frozen=True)
class Item:
    """One multimodal item of a request: vLLM's identifier, its placeholder size, its
    modality and the transfer id a proxy gave it (``ec_transfer_params``)."""

    identifier: str
    tokens: int
    modality: str = "image"
    transfer_id: str | None = None


@dataclass
class Finished:
    request_id: str
    reason: str  # vLLM's FinishReason name: STOP, LENGTH, ABORT, ERROR
    step: int
    seconds: float  # since it was added


@dataclass
class Misses:
    """What a GPU runner would have raised on: an item scheduled and not in the cache."""

    encoder_cache_miss: list[str] = field(default_factory=list)
    wrong_tensor: list[str] = field(default_factory=list)


class Instance:
    """One vLLM instance in this process: its real scheduler, ``tp`` ranks' worker-side
    connectors, and a fake model of encoder-output ``width`` in ``dtype``.

    Args:
        model_dir: a model directory (:func:`write_tiny_model`).
        ec_transfer: the ``ECTransferConfig`` fields (``ec_connector``, ``ec_role``, ...).
        tp: tensor-parallel ranks (each with its own connector and encoder cache).
        check: compare every tensor a consumer's rank loads with the one the encoder made.
    """

    def __init__(
        self,
        model_dir: str | Path,
        ec_transfer: dict[str, Any],
        *,
        tp: int = 1,
        width: int = 64,
        dtype: torch.dtype = torch.float16,
        max_model_len: int = 1 << 18,
        max_num_seqs: int = 64,
        max_batched_tokens: int = 1 << 18,
        kv_blocks: int = 1 << 17,
        check: bool = True,
    ) -> None:
        _vllm()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from vllm.utils.hashing import sha256  # noqa: PLC0415
        from vllm.v1.core.kv_cache_utils import (  # noqa: PLC0415
            get_request_block_hasher,
            init_none_hash,
        )
        from vllm.v1.core.sched.scheduler import Scheduler  # noqa: PLC0415
        from vllm.v1.structured_output import StructuredOutputManager  # noqa: PLC0415

        if type(tp) is not int or tp < 1:
            raise InvalidArgumentError(f"tp must be an int >= 1, not {tp!r}")
        block = 16
        config, kv = _configs(
            model_dir,
            ec_transfer,
            tp,
            width,
            dtype,
            max_model_len,
            max_num_seqs,
            max_batched_tokens,
            kv_blocks,
            block,
        )
        self.config = config
        self.width, self.dtype, self.check = width, dtype, check
        self.producer = bool(config.ec_transfer_config.is_ec_producer)
        self.scheduler = Scheduler(
            vllm_config=config,
            kv_cache_config=kv,
            structured_output_manager=StructuredOutputManager(config),
            block_size=block,
            log_stats=False,
        )
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(block, sha256)
        self.caches: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        self.connectors, self.ranks = _workers(config, self.caches)
        self.step_count = 0
        self.added: dict[str, float] = {}
        self.items: dict[str, list[Item]] = {}
        self.finished: list[Finished] = []
        self.misses = Misses()
        self.embedded: dict[str, float] = {}  # when a request's items were all in the cache

    # -- requests ----------------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        items: Sequence[Item],
        *,
        text: int = 8,
        max_tokens: int = 1,
        ec_params: dict[str, Any] | None = None,
    ) -> None:
        """A request of ``text`` prompt tokens, then ``items`` one after another, with the
        proxy's ``ec_transfer_params`` for those that carry a transfer id (and
        ``ec_params`` beside them, such as vLLM's Mooncake producer's ``consumer_zmq``)."""
        from vllm.multimodal.inputs import (  # noqa: PLC0415
            MultiModalFeatureSpec,
            MultiModalKwargsItem,
            PlaceholderRange,
        )
        from vllm.sampling_params import SamplingParams  # noqa: PLC0415
        from vllm.v1.request import Request  # noqa: PLC0415

        features, offset = [], text
        for item in items:
            features.append(
                MultiModalFeatureSpec(
                    data=MultiModalKwargsItem.dummy(),
                    modality=item.modality,
                    identifier=item.identifier,
                    mm_hash=item.identifier,
                    mm_position=PlaceholderRange(offset=offset, length=item.tokens),
                )
            )
            offset += item.tokens
        params: dict[str, Any] = {}
        if any(item.transfer_id for item in items):
            entries = [{"mm_hash": i.identifier, "transfer_id": i.transfer_id} for i in items]
            params["ec_transfer_params"] = {"ec_items": entries, **(ec_params or {})}
        request = Request(
            request_id=request_id,
            prompt_token_ids=[1] * (offset + 4),
            sampling_params=SamplingParams(
                max_tokens=max_tokens, ignore_eos=True, extra_args=params
            ),
            pooling_params=None,
            mm_features=features,
            block_hasher=self._hasher,
        )
        self.scheduler.add_request(request)
        self.added[request_id] = time.perf_counter()
        self.items[request_id] = list(items)

    def abort(self, request_id: str) -> None:
        """The engine aborts a request (a client went away): ``finish_requests``."""
        from vllm.v1.request import RequestStatus  # noqa: PLC0415

        self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)

    # -- one engine step -----------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """``schedule()``, every rank's step, the ranks' outputs folded, ``update_from_output``."""
        from vllm.distributed.ec_transfer.ec_connector.utils import (  # noqa: PLC0415
            ECOutputAggregator,
        )
        from vllm.v1.outputs import (  # noqa: PLC0415
            ModelRunnerOutput,
            make_empty_encoder_model_runner_output,
        )

        sched = self.scheduler
        out = sched.schedule()
        self.step_count += 1
        outputs = []
        for active, cache in zip(self.ranks, self.caches, strict=True):
            for identifier in out.free_encoder_mm_hashes:  # model_runner.py:1271-1274
                cache.pop(identifier, None)
            if out.total_num_scheduled_tokens == 0:
                outputs.append(active.no_forward(out))
                continue
            with active.maybe_get_output(out) as ec_out:
                self._encode(out, cache)
                if not self.producer:
                    self._gather(out, cache)
            if self.producer:
                mro = make_empty_encoder_model_runner_output(out)
            else:
                ids = list(out.num_scheduled_tokens)
                done = [
                    sched.requests[r].num_computed_tokens >= sched.requests[r].num_prompt_tokens
                    for r in ids
                ]
                mro = ModelRunnerOutput(
                    req_ids=ids, sampled_token_ids=[[7] if d else [] for d in done]
                )
            outputs.append(ModelRunnerOutput.with_ec_conn_output(mro, ec_out))
        merged = ECOutputAggregator().aggregate(outputs, 0) if len(outputs) > 1 else outputs[0]
        engine_outputs = sched.update_from_output(out, merged)
        now, done_now = time.perf_counter(), []
        for batch in engine_outputs.values():
            for o in batch.outputs:
                if o.finish_reason is not None:
                    f = Finished(
                        o.request_id,
                        o.finish_reason.name,
                        self.step_count,
                        now - self.added.pop(o.request_id, now),
                    )
                    done_now.append(f)
        self.finished.extend(done_now)
        return done_now

    def _encode(self, out: Any, cache: dict[str, torch.Tensor]) -> None:
        """The fake encoder: what vLLM scheduled to encode here is computed and cached."""
        for request_id, indices in out.scheduled_encoder_inputs.items():
            features = self.scheduler.requests[request_id].mm_features
            for i in indices:
                f = features[i]
                tokens = int(f.mm_position.get_num_embeds())
                cache[f.identifier] = encoder_output(f.identifier, tokens, self.width, self.dtype)

    def _gather(self, out: Any, cache: dict[str, torch.Tensor]) -> None:
        """gather_mm_embeddings' check: every item this step's tokens reach is cached
        (else the GPU runner raises "Encoder cache miss"), and is the encoder's."""
        for request_id, n in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[request_id]
            end = request.num_computed_tokens
            start = end - n
            for f in request.mm_features:
                pos = f.mm_position
                if pos.offset + pos.length <= start or pos.offset >= end:
                    continue
                got = cache.get(f.identifier)
                if request_id not in self.embedded:
                    self.embedded[request_id] = time.perf_counter()
                if got is None:
                    self.misses.encoder_cache_miss.append(f.identifier)
                elif self.check and not torch.equal(
                    got,
                    encoder_output(f.identifier, int(pos.get_num_embeds()), self.width, self.dtype),
                ):
                    self.misses.wrong_tensor.append(f.identifier)

    def busy(self) -> bool:
        return bool(self.scheduler.has_requests())

    def shutdown(self) -> None:
        for connector in self.connectors:
            connector.shutdown()
        self.scheduler.shutdown()


def _configs(
    model_dir: str | Path,
    ec_transfer: dict[str, Any],
    tp: int,
    width: int,
    dtype: torch.dtype,
    max_model_len: int,
    max_num_seqs: int,
    max_batched_tokens: int,
    kv_blocks: int,
    block: int,
) -> tuple[Any, Any]:
    """The ``VllmConfig`` and ``KVCacheConfig`` of an instance (the KV cache is bookkeeping
    only: nothing is allocated for it)."""
    from vllm.config import (  # noqa: PLC0415
        CacheConfig,
        DeviceConfig,
        ECTransferConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.kv_cache_interface import (  # noqa: PLC0415
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )

    model = ModelConfig(model=str(model_dir), max_model_len=max_model_len, dtype=dtype, seed=0)
    ec = ECTransferConfig(**ec_transfer)
    ec.mm_encoder_output_widths = {"image": width, "video": width}  # measured at start-up
    config = VllmConfig(
        model_config=model,
        device_config=DeviceConfig(device="cpu"),
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=True,
            is_encoder_decoder=model.is_encoder_decoder,
        ),
        cache_config=CacheConfig(block_size=block, enable_prefix_caching=False),
        ec_transfer_config=ec,
    )
    config.cache_config.num_gpu_blocks = kv_blocks
    spec = FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv = KVCacheConfig(
        num_blocks=kv_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)],
    )
    return config, kv


def _workers(config: Any, caches: list[dict[str, torch.Tensor]]) -> tuple[list[Any], list[Any]]:
    """Per rank, the worker connector and vLLM's ``ActiveECConnector`` around it, as each
    worker process builds them (``gpu_worker.py:1868``, ``gpu/ec_connector.py:95-105``)."""
    from vllm.distributed.ec_transfer import ec_transfer_state as state  # noqa: PLC0415
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole  # noqa: PLC0415
    from vllm.distributed.ec_transfer.ec_connector.factory import (  # noqa: PLC0415
        ECConnectorFactory,
    )
    from vllm.v1.worker.gpu.ec_connector import ActiveECConnector  # noqa: PLC0415

    cls = ECConnectorFactory.get_connector_class(config.ec_transfer_config)
    takes_rank = "rank" in inspect.signature(cls.__init__).parameters
    connectors, ranks = [], []
    for rank, cache in enumerate(caches):
        if takes_rank:
            connector = cls(config, ECConnectorRole.WORKER, rank=rank)
        elif rank == 0:
            connector = ECConnectorFactory.create_connector(config, ECConnectorRole.WORKER)
        else:
            raise InvalidArgumentError(
                f"{cls.__name__} cannot be given a tensor-parallel rank here: tp must be 1"
            )
        connector.start_worker_services()  # gpu_worker.py:612-613
        # ActiveECConnector reads the process's worker connector (ec_transfer_state.py):
        # this process is every rank's worker, so each rank's is set while it is made.
        saved, state._EC_CONNECTOR_AGENT = state._EC_CONNECTOR_AGENT, connector
        try:
            ranks.append(ActiveECConnector(config, cache))
        finally:
            state._EC_CONNECTOR_AGENT = saved
        connectors.append(connector)
    return connectors, ranks


def run(
    instances: Sequence[Instance],
    *,
    max_steps: int = 100_000,
    until: Callable[[], bool] | None = None,
    between: Callable[[int], None] | None = None,
) -> int:
    """Step every instance, in turn, until none has work (or ``until()``); ``between(step)``
    runs before each round of steps (to add or abort requests). Returns the steps taken."""
    for step in range(max_steps):
        if between is not None:
            between(step)
        if until is not None and until():
            return step
        if until is None and not any(i.busy() for i in instances):
            return step
        for instance in instances:
            instance.step()
    return max_steps
