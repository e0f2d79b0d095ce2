"""The DALI loader's GPU graph (`decoder="mixed"`, `device_id=0`), traced on the CPU: where each op runs, and how
each per-sample random draw reaches the GPU ops.

`Pipeline._build_graph()` runs the pipeline definition and collects its operators without touching a device, so the
graph that a GPU machine would run can be inspected here. DALI 2.4 (the pinned version) keeps them in `pipe._ops`,
in topological order; each is an `_OperatorInstance` with `_op.device` ("cpu", "mixed" or "gpu"), `_op._init_args`
(its scalar arguments), and `inputs`: the first `spec.NumRegularInput()` are its regular inputs, the rest its
argument inputs (per-sample arguments, which DALI accepts only from CPU operators). A CPU value feeding a GPU op's
regular input is copied host to device (the per-sample contrast factor and hue shift, in arithmetic ops); a CPU op fed
from a GPU op would be a copy back to the host, which the graph must never hold.

What is checked, for both views, with the decoder settings (`random_crop_decoder`, `exact_hue`, `hw_decoder_load`)
and the default `cpu_kernels` (which must not put the CPU jitter kernel into a GPU graph):
  - placement: readers and the shape peek on the CPU, the decoder `mixed`, every op downstream of it on the GPU, every
    other op on the CPU, no GPU-to-CPU edge;
  - the draws (the loader's own `debug_params` outputs, named as it names them): CPU operators, each reaching exactly
    the GPU ops it parametrises, and how (argument input, host-to-device input, or `if` predicate);
  - the `if` predicates: every split and merge takes its predicate from the CPU, the GPU ones from the coins or the
    jitter order;
  - the CPU twin (`decoder="cpu"`) holds the same operators in the same order: DALI seeds each random operator from
    the pipeline seed by its position, so the same seed gives the GPU graph and its CPU twin the same draws (what the
    GPU value tests in `test_dali_gpu_values.py` rely on).
"""
from __future__ import annotations

import collections
import functools
import types as pytypes
from typing import NamedTuple

import pytest

pytest.importorskip("nvidia.dali")

from nvidia.dali import backend as dali_backend  # noqa: E402
from nvidia.dali import types  # noqa: E402

from byolfast.pipeline.config import AugmentConfig, DaliConfig  # noqa: E402
from byolfast.pipeline.backends.dali.loader import DEBUG_DRAWS, DaliTwoViewLoader, two_view_pipeline  # noqa: E402

SIZE = 32
FOLDER = {"kind": "folder", "files": ["/nowhere/0.jpg"], "indices": [0]}   # tracing opens no file
SHARDS = {"kind": "shards", "tars": ["/nowhere/0.tar"], "indices": ["/nowhere/0.idx"], "shard_id": 0,
          "num_shards": 1, "shuffle": True, "initial_fill": 8}
DRAW_OPS = ("CoinFlip", "Uniform", "RandomCropGenerator")
READERS = ("File", "Webdataset")
DECODERS = ("Image", "ImageSlice")
# Each view's draws: what they parametrise on the GPU (consumer op, how). "argument": a per-sample argument input;
# "input": a regular input of a GPU op, copied host to device; "predicate": the condition of an `if` (split / merge).
# Draws of the default spec; blur and solarize of view 1 are unused (blur_p = 1: every sample is blurred without a
# condition; solarize_p = 0: no solarisation), and the loader still reports them.
JITTER_PREDICATE = {("Split", "predicate"), ("Merge", "predicate")}
REACHES = {
    "flip": {("CropMirrorNormalize", "argument")},
    "jitter": JITTER_PREDICATE,
    "order": JITTER_PREDICATE,
    "brightness": {("BrightnessContrast", "argument")},
    "contrast": {("_ArithmeticGenericOp", "input")},
    "saturation": {("_ArithmeticGenericOp", "input")},   # the default maths' HSV saturation, in arithmetic
    "gray": JITTER_PREDICATE,
    "sigma": {("GaussianBlur", "argument")},
}
SETTINGS = [pytest.param(rcd, hue, load, id=f"{'crop_decoder' if rcd else 'decode_once'}-"
                         f"{'exact_hue' if hue else 'hsv_hue'}-hw{load}")
            for rcd in (False, True) for hue in (True, False) for load in (0.0, 0.65)]


class Edge(NamedTuple):
    producer: object   # the _OperatorInstance whose output is consumed
    consumer: object
    how: str           # "input", "argument" or "predicate"
    node: object       # the DataNode as the consumer sees it (its device says where the consumer reads it)


def kind(op) -> str:
    return type(op._op).__name__


def device(op) -> str:
    return op._op.device


class Graph:
    """A traced pipeline: its operators, its outputs, and every edge between them."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.ops = list(pipe._ops)
        self.outputs = list(pipe._graph_outputs)
        self.edges: list[Edge] = []
        for op in self.ops:
            regular = op.spec.NumRegularInput()
            for i, node in enumerate(op.inputs):
                how = "input" if i < regular else "predicate" if kind(op) in ("Split", "Merge") else "argument"
                self.edges.append(Edge(node.source, op, how, node))
        self.consumers: dict[int, list[Edge]] = collections.defaultdict(list)
        for e in self.edges:
            self.consumers[id(e.producer)].append(e)

    def of_kind(self, *kinds: str) -> list:
        return [op for op in self.ops if kind(op) in kinds]

    def downstream(self, op) -> set[int]:
        """ids of the ops fed by `op`, directly or not, predicates included."""
        seen: set[int] = set()
        todo = [op]
        while todo:
            for e in self.consumers[id(todo.pop())]:
                if id(e.consumer) not in seen:
                    seen.add(id(e.consumer))
                    todo.append(e.consumer)
        return seen

    def gpu_uses(self, op) -> set[tuple[str, str]]:
        """(op kind, how) of each GPU or mixed op that the value of `op` reaches through CPU ops only.

        A CPU split or merge passes on its data input, not its predicate: a draw that is only the condition of a
        CPU split (the jitter coin splitting the brightness factor) does not carry its value past it.
        """
        uses, seen, todo = set(), set(), [op]
        while todo:
            for e in self.consumers[id(todo.pop())]:
                if device(e.consumer) != "cpu":
                    uses.add((kind(e.consumer), e.how))
                elif e.how != "predicate" and id(e.consumer) not in seen:
                    seen.add(id(e.consumer))
                    todo.append(e.consumer)
        return uses

    def sources(self, op, through_cpu: bool = True) -> set[str]:
        """Kinds of the CPU ops without inputs (draws, readers) that `op`'s inputs come from."""
        found, seen, todo = set(), set(), [op]
        while todo:
            cur = todo.pop()
            if not cur.inputs:
                found.add(kind(cur))
            for node in cur.inputs:
                if id(node.source) not in seen and (not through_cpu or device(node.source) == "cpu"):
                    seen.add(id(node.source))
                    todo.append(node.source)
        return found


@functools.lru_cache(maxsize=None)
def trace(random_crop_decoder: bool = False, exact_hue: bool = True, hw_decoder_load: float = 0.65,
          decoder: str = "mixed", source: str = "folder", debug: bool = False, color_ops: str = "deepmind") -> Graph:
    """The graph `DaliTwoViewLoader._build` would run on GPU 0 (the CPU twin with `decoder="cpu"`), traced only."""
    d = DaliConfig()
    on_gpu = decoder == "mixed"
    pipe = two_view_pipeline(
        source=FOLDER if source == "folder" else SHARDS, aug=AugmentConfig(color_ops=color_ops), image_size=SIZE,
        decoder=decoder,
        random_crop_decoder=random_crop_decoder, hw_decoder_load=hw_decoder_load, out_dtype=types.FLOAT,
        debug=debug, exact_hue=exact_hue,
        # the loader passes its CPU threads when cpu_kernels is on (the default); the GPU twin compares the graph ops
        cpu_threads=d.num_threads if d.cpu_kernels and on_gpu else 0,
        batch_size=8, num_threads=d.num_threads, device_id=0 if on_gpu else None, seed=1,
        prefetch_queue_depth=d.prefetch_queue_depth, exec_dynamic=True)
    pipe._build_graph()
    return Graph(pipe)


def draw_nodes(graph: Graph, source: str = "folder") -> dict[str, object]:
    """The loader's debug outputs by the names it gives them (`view1/flip`, ..., `image_shape`)."""
    loader = pytypes.SimpleNamespace(kind="shards" if source == "shards" else "folder", debug_params=True)
    names = DaliTwoViewLoader._output_names(loader)
    assert len(names) == len(graph.outputs)
    return dict(zip(names, graph.outputs))


@pytest.mark.parametrize("random_crop_decoder,exact_hue,hw_decoder_load", SETTINGS)
def test_ops_run_where_they_should(random_crop_decoder, exact_hue, hw_decoder_load):
    g = trace(random_crop_decoder, exact_hue, hw_decoder_load)
    assert len(g.ops) > 300, "the whole two-view augmentation was traced"
    decoders = g.of_kind(*DECODERS)
    assert [kind(op) for op in decoders] == (["ImageSlice"] * 2 if random_crop_decoder else ["Image"])
    for op in decoders:
        assert device(op) == "mixed"
        assert op._op._init_args["hw_decoder_load"] == hw_decoder_load
    assert [(kind(op), device(op)) for op in g.of_kind(*READERS, "PeekImageShape")] == [
        ("File", "cpu"), ("PeekImageShape", "cpu")]
    image_path: set[int] = set()
    for op in decoders:
        image_path |= g.downstream(op)
    for op in g.ops:
        if op in decoders:
            continue
        where = "gpu" if id(op) in image_path else "cpu"
        assert device(op) == where, f"{op.name} ({kind(op)}) runs on {device(op)}, expected {where}"
    for e in g.edges:
        assert not (device(e.consumer) == "cpu" and device(e.producer) != "cpu"), \
            f"{e.consumer.name} copies {e.producer.name} from the GPU back to the host"
    assert not g.of_kind("PythonFunction", "DLTensorPythonFunction"), "the CPU jitter kernel is for CPU images only"
    cmn = g.of_kind("CropMirrorNormalize")
    assert len(cmn) == 2 and all(device(op) == "gpu" for op in cmn)
    assert [o.device for o in g.outputs] == ["gpu", "gpu", "cpu"], "two views on the GPU, the index from the reader"


def test_shard_reader_runs_on_the_cpu():
    g = trace(source="shards")
    assert [(kind(op), device(op)) for op in g.of_kind(*READERS)] == [("Webdataset", "cpu")]
    assert [o.device for o in g.outputs] == ["gpu", "gpu", "cpu", "cpu"], "views, index, label"
    assert [device(op) for op in g.of_kind(*DECODERS)] == ["mixed"]


@pytest.mark.parametrize("random_crop_decoder,exact_hue,hw_decoder_load", SETTINGS)
def test_every_draw_is_a_cpu_op_that_reaches_the_gpu(random_crop_decoder, exact_hue, hw_decoder_load):
    """In the graph the loader runs (no debug outputs), no draw is wasted and none runs on the GPU."""
    g = trace(random_crop_decoder, exact_hue, hw_decoder_load)
    draws = g.of_kind(*DRAW_OPS)
    counts = collections.Counter(kind(op) for op in draws)
    # per view: 6 uniform draws (order, brightness, contrast, saturation, hue, sigma), 1 crop window, and the coins
    # that do something: flip, jitter, grayscale (view 1); and blur, solarize (view 2)
    assert counts == {"Uniform": 12, "CoinFlip": 8, "RandomCropGenerator": 2}
    for op in draws:
        assert device(op) == "cpu", f"{op.name} draws on {device(op)}"
        assert g.gpu_uses(op), f"{op.name} reaches no GPU op"


@pytest.mark.parametrize("view", [1, 2])
@pytest.mark.parametrize("random_crop_decoder,exact_hue,hw_decoder_load", SETTINGS)
def test_each_draw_parametrises_its_gpu_ops(view, random_crop_decoder, exact_hue, hw_decoder_load):
    g = trace(random_crop_decoder, exact_hue, hw_decoder_load, debug=True)
    nodes = draw_nodes(g)
    expected = dict(REACHES)
    # exact hue: a shift added in GPU arithmetic (copied to the device); DALI's hue: fn.hsv's argument input
    expected["hue"] = {("_ArithmeticGenericOp", "input")} if exact_hue else {("Hsv", "argument")}
    window = {("ImageSlice", "input")} if random_crop_decoder else {("Resize", "argument")}
    expected["crop_anchor"] = expected["crop_shape"] = window
    if view == 1:
        expected["blur"] = expected["solarize"] = set()
    else:
        expected["blur"] = expected["solarize"] = JITTER_PREDICATE
    assert set(expected) == set(DEBUG_DRAWS)
    for name in DEBUG_DRAWS:
        node = nodes[f"view{view}/{name}"]
        op = node.source
        assert device(op) == "cpu" and kind(op) in DRAW_OPS, f"view{view}/{name}: {kind(op)} on {device(op)}"
        assert g.gpu_uses(op) == expected[name], f"view{view}/{name}"
    # the two views draw independently: no draw op is shared
    other = {id(nodes[f"view{3 - view}/{k}"].source) for k in DEBUG_DRAWS}
    assert not other & {id(nodes[f"view{view}/{k}"].source) for k in DEBUG_DRAWS}


def test_torchvision_maths_draws_reach_their_ops():
    """With `color_ops=torchvision` the jitter draws parametrise torchvision's ops: brightness and saturation as
    argument inputs of `fn.brightness_contrast` and `fn.hsv`; every op placed as with the default maths."""
    g = trace(color_ops="torchvision", debug=True)
    nodes = draw_nodes(g)
    for view in (1, 2):
        for name, expected in (("brightness", REACHES["brightness"]), ("contrast", REACHES["contrast"]),
                               ("saturation", {("Hsv", "argument")})):
            assert g.gpu_uses(nodes[f"view{view}/{name}"].source) == expected, f"view{view}/{name}"
    for e in g.edges:
        assert not (device(e.consumer) == "cpu" and device(e.producer) != "cpu")


@pytest.mark.parametrize("random_crop_decoder,exact_hue", [(False, True), (True, False)])
def test_if_predicates_come_from_the_cpu(random_crop_decoder, exact_hue):
    g = trace(random_crop_decoder, exact_hue)
    splits = g.of_kind("Split", "Merge")
    gpu_splits = [op for op in splits if device(op) == "gpu"]
    assert len(gpu_splits) > 20, "the per-sample probabilities are `if`s on the GPU images"
    for op in splits:
        predicates = [e for e in g.edges if e.consumer is op and e.how == "predicate"]
        assert len(predicates) == 1, f"{op.name}: {len(predicates)} predicates"
        p = predicates[0]
        assert device(p.producer) == "cpu" and p.node.device == "cpu", f"{op.name}: predicate on {p.node.device}"
        if device(op) == "gpu":   # decided per sample by a coin or by the jitter order
            assert g.sources(p.producer) <= {"CoinFlip", "Uniform"}, f"{op.name}: {g.sources(p.producer)}"


@pytest.mark.parametrize("random_crop_decoder,exact_hue", [(False, True), (True, False)])
def test_the_cpu_twin_holds_the_same_seeded_ops_in_the_same_order(random_crop_decoder, exact_hue):
    """Same operators, same order, same arguments (the device and the GPU decoder's load aside) as with
    `decoder="cpu"`: DALI hands out seeds to the operators with a random seed, in the order they are added, so the
    two pipelines built with one seed draw the same crops, coins and factors."""
    def sequence(g: Graph) -> list[tuple[str, str, str]]:
        skip = ("device", "hw_decoder_load")
        return [(kind(op), op.name, repr(sorted((k, v) for k, v in op._op._init_args.items()
                                                 if k not in skip and not k.startswith("_origin"))))
                for op in g.ops]

    gpu = trace(random_crop_decoder, exact_hue, debug=True)
    cpu = trace(random_crop_decoder, exact_hue, decoder="cpu", debug=True)
    assert sequence(gpu) == sequence(cpu)
    seeded = [kind(op) for op in gpu.ops if dali_backend.GetSchema(op._op.schema_name).HasRandomSeedArg()]
    assert set(seeded) == {*DRAW_OPS, "File"}, "the draws take seeds, and the reader (for its shuffle)"
    assert all(device(op) == "cpu" for op in cpu.ops)
