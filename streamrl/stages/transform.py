"""``TransformStage``: transforms applied to the chunks flowing through a pipeline.

::

    p.add(EnvStage("env", ...), TransformStage("frames", Compose(ToTensorImage(), GrayScale(), CatFrames(4))),
          WriterStage("writer", ...))
    p.connect("env.chunks", "frames.chunks")
    p.connect("frames.chunks", "writer.chunks")

Chunks ``[num_envs, T]`` arrive in order from one stream, so stateful transforms (``CatFrames``,
``StepCounter``, ``RewardSum``) continue across chunk boundaries the episodes a chunk left open
(``Transform.forward_chunk``). Each chunk is copied shallowly first: consumers of the input stream do not see the
new entries.
"""

from __future__ import annotations

from streamrl.stages.base import Stage, StageContext
from streamrl.transforms.base import Transform


class TransformStage(Stage):
    """Receives chunks, applies ``transform`` (``forward_chunk``), sends the result on."""

    inputs = ("chunks",)
    outputs = ("chunks",)

    def __init__(self, name: str, transform: Transform) -> None:
        super().__init__(name)
        if not isinstance(transform, Transform):
            raise TypeError(f"TransformStage({name!r}) takes a Transform (or a Compose), got {transform!r}")
        self.transform = transform

    async def run(self, ctx: StageContext) -> None:
        out = ctx.output("chunks")
        async for chunk in ctx.input("chunks"):
            await out.send(self.transform.forward_chunk(chunk.clone(recurse=False)))

    async def close(self, ctx: StageContext) -> None:
        self.transform.close()

    def __repr__(self) -> str:
        return f"TransformStage({self.name!r}, {self.transform!r})"
