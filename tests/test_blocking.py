"""Tests of scalable_shampoo.blocking (SPEC 2.1: merging, splitting, round trips).

Every expectation about which elements land in which block is checked against an
independent reference written here (plain Python index ranges and basic slicing),
not against the library's own ``chunk_sizes``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalable_shampoo.blocking import (BlockLayout, block_layout, block_regions, merge_blocks,
                                       merged_shape, region_view, split_blocks)

# ---------------------------------------------------------------------------------------
# Independent reference implementation of SPEC 2.1
# ---------------------------------------------------------------------------------------


def reference_merged_shape(shape, block_size):
    """SPEC 2.1 by groups: drop size-1 dims, then grow the current group of adjacent
    dimensions while the group's product stays <= block_size."""
    groups: list[list[int]] = []
    for size in (s for s in shape if s != 1):
        if groups and math.prod(groups[-1]) * size <= block_size:
            groups[-1].append(size)
        else:
            groups.append([size])
    return tuple(math.prod(group) for group in groups)


def reference_chunks(size, block_size, max_preconditioned_dim):
    """(start, stop) index ranges of the chunks of one merged dimension."""
    if size > max_preconditioned_dim:
        return [(0, size)]  # no factor: the dimension stays whole
    return [(start, min(start + block_size, size)) for start in range(0, size, block_size)]


def reference_block_slices(shape, block_size, max_preconditioned_dim):
    """Merged shape and, in row-major order over the chunk grid, one tuple of slices
    per block into the tensor reshaped to the merged shape."""
    merged = reference_merged_shape(shape, block_size)
    ranges = [reference_chunks(size, block_size, max_preconditioned_dim) for size in merged]
    slices = [tuple(slice(start, stop) for start, stop in combo)
              for combo in itertools.product(*ranges)]
    return merged, slices


def random_tensor(shape, seed, dtype=torch.float64):
    """Distinct, random values (a shuffled arange plus noise), so a misplaced element
    is always detected."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    values = torch.randperm(numel, generator=generator).to(dtype) \
        + torch.rand(numel, generator=generator, dtype=dtype) * 0.5
    return values.reshape(shape)


# ---------------------------------------------------------------------------------------
# merged_shape: table of spec examples and edge cases
# ---------------------------------------------------------------------------------------

MERGED_SHAPE_CASES = [
    # (shape, block_size, expected merged shape)
    ((64, 3, 3, 3), 1024, (576, 3)),        # SPEC: conv kernel
    ((32, 16), 1024, (512,)),               # SPEC: 32x16 matrix -> vector of 512
    ((), 1024, ()),                         # scalar
    ((1,), 1024, ()),
    ((1, 1, 1), 1024, ()),                  # all ones
    ((7,), 1024, (7,)),                     # 1-d
    ((2000,), 1024, (2000,)),               # 1-d larger than block_size stays one dim
    ((1024,), 1024, (1024,)),
    ((1, 5, 1), 1024, (5,)),
    ((1024, 1), 1024, (1024,)),
    ((32, 32), 1024, (1024,)),              # product == block_size still merges
    ((32, 33), 1024, (32, 33)),             # 1056 > 1024
    ((3, 3, 64, 128), 1024, (576, 128)),    # HWIO conv kernel
    ((128, 64, 3, 3), 1024, (128, 576)),    # OIHW conv kernel: 128*64 too big
    ((256, 3, 5, 5), 1024, (768, 25)),      # 256*3 = 768, then 768*5 > 1024
    ((2, 600, 2), 1024, (2, 600, 2)),       # every neighbour product > 1024
    ((10, 1, 10, 1, 10), 1024, (1000,)),    # ones between mergeable dims
    ((5000, 64), 1024, (5000, 64)),         # embedding
    ((4, 4, 4), 16, (16, 4)),               # small block_size
    ((3, 4), 1, (3, 4)),                    # block_size 1 merges nothing
    ((1, 1), 1, ()),
    ((2, 2, 2, 2), 8, (8, 2)),
]


@pytest.mark.parametrize("shape, block_size, expected", MERGED_SHAPE_CASES,
                         ids=[f"{s}-bs{b}" for s, b, _ in MERGED_SHAPE_CASES])
def test_merged_shape_examples(shape, block_size, expected):
    assert merged_shape(shape, block_size) == expected
    assert reference_merged_shape(shape, block_size) == expected  # the reference agrees
    # torch.Size is accepted like a tuple
    assert merged_shape(torch.Size(shape), block_size) == expected


@pytest.mark.parametrize("shape, expected", [
    ((32, 16, 3, 3), (32, 16, 3, 3)),   # merged: (512, 9)
    ((32, 1, 3, 3), (32, 3, 3)),        # size-1 dimensions are still squeezed
    ((6, 25), (6, 25)),                 # merged: one 150-long vector
    ((1, 1), ()),
    ((2048, 4), (2048, 4)),
])
def test_merged_shape_without_merging_only_squeezes(shape, expected):
    assert merged_shape(shape, 1024, merge_dims=False) == expected
    layout = block_layout(shape, 1024, 4096, merge_dims=False)
    assert layout.merged_shape == expected
    # Dimensions above block_size are still split.
    assert all(max(chunks) <= 1024 for chunks in layout.chunk_sizes if chunks)


# ---------------------------------------------------------------------------------------
# block_layout: table of concrete layouts
# ---------------------------------------------------------------------------------------

LAYOUT_CASES = [
    # (shape, block_size, max_preconditioned_dim,
    #  merged, chunk_sizes, preconditioned, num_blocks)
    ((64, 3, 3, 3), 1024, 4096, (576, 3), ((576,), (3,)), (True, True), 1),
    ((5000, 64), 1024, 4096, (5000, 64), ((5000,), (64,)), (False, True), 1),
    ((2500, 300), 1024, 4096, (2500, 300), ((1024, 1024, 452), (300,)), (True, True), 3),
    ((3000, 3000), 1024, 8192, (3000, 3000),
     ((1024, 1024, 952), (1024, 1024, 952)), (True, True), 9),
    ((2048,), 1024, 4096, (2048,), ((1024, 1024),), (True,), 2),
    ((2048, 1), 1024, 2048, (2048,), ((1024, 1024),), (True,), 2),  # == max: split
    ((2049,), 1024, 2048, (2049,), ((2049,),), (False,), 1),        # > max: whole
    ((10, 7), 4, 100, (10, 7), ((4, 4, 2), (4, 3)), (True, True), 6),
    ((), 1024, 4096, (), (), (), 1),
    ((1, 1), 1024, 4096, (), (), (), 1),
    ((6, 50, 6), 8, 40, (6, 50, 6), ((6,), (50,), (6,)), (True, False, True), 1),
]


@pytest.mark.parametrize(
    "shape, block_size, max_dim, merged, chunk_sizes, preconditioned, num_blocks",
    LAYOUT_CASES, ids=[f"{c[0]}-bs{c[1]}-max{c[2]}" for c in LAYOUT_CASES])
def test_block_layout_examples(shape, block_size, max_dim, merged, chunk_sizes,
                               preconditioned, num_blocks):
    layout = block_layout(shape, block_size, max_dim)
    assert isinstance(layout, BlockLayout)
    assert layout.param_shape == shape
    assert layout.merged_shape == merged
    assert layout.chunk_sizes == chunk_sizes
    assert layout.preconditioned == preconditioned
    assert layout.num_blocks == num_blocks
    assert layout.block_shapes == [tuple(c) for c in itertools.product(*chunk_sizes)]
    assert len(layout.block_shapes) == num_blocks
    assert layout.preconditioned_dims == tuple(i for i, p in enumerate(preconditioned) if p)


def test_layout_block_shapes_are_row_major():
    layout = block_layout((10, 7), 4, 100)
    assert layout.block_shapes == [(4, 4), (4, 3), (4, 4), (4, 3), (2, 4), (2, 3)]


@pytest.mark.parametrize("block_size, max_dim", [(0, 10), (10, 0), (-1, 10), (10, -5)])
def test_block_layout_rejects_non_positive_sizes(block_size, max_dim):
    with pytest.raises(ValueError, match=">= 1"):
        block_layout((4, 4), block_size, max_dim)


# ---------------------------------------------------------------------------------------
# Concrete split / merge examples with explicit index ranges
# ---------------------------------------------------------------------------------------

SPLIT_CASES = [
    # (shape, block_size, max_preconditioned_dim)
    ((64, 3, 3, 3), 1024, 4096),
    ((2500, 30), 1024, 4096),
    ((10, 7), 4, 100),
    ((3, 1, 11, 1, 5), 4, 100),
    ((9, 9, 9), 5, 50),
    ((6, 50, 6), 8, 40),
    ((33,), 8, 64),
    ((), 4, 4),
    ((1, 1, 1), 4, 4),
]


@pytest.mark.parametrize("shape, block_size, max_dim", SPLIT_CASES,
                         ids=[f"{s}-bs{b}-max{m}" for s, b, m in SPLIT_CASES])
def test_split_blocks_contents_match_explicit_slices(shape, block_size, max_dim):
    tensor = random_tensor(shape, seed=sum(shape) + block_size)
    layout = block_layout(shape, block_size, max_dim)
    blocks = split_blocks(tensor, layout)

    merged, slices = reference_block_slices(shape, block_size, max_dim)
    reshaped = tensor.reshape(merged)
    assert len(blocks) == len(slices)
    for block, index in zip(blocks, slices):
        assert torch.equal(block, reshaped[index])
    assert torch.equal(merge_blocks(blocks, layout), tensor)


def test_explicit_2d_split_by_hand():
    """10x7 with block_size 4: rows [0:4], [4:8], [8:10] x cols [0:4], [4:7]."""
    tensor = random_tensor((10, 7), seed=3)
    blocks = split_blocks(tensor, block_layout((10, 7), 4, 100))
    rows = [(0, 4), (4, 8), (8, 10)]
    cols = [(0, 4), (4, 7)]
    expected = [tensor[r0:r1, c0:c1] for (r0, r1) in rows for (c0, c1) in cols]
    assert len(blocks) == 6
    for got, want in zip(blocks, expected):
        assert torch.equal(got, want)


def test_embedding_above_max_preconditioned_dim():
    """A 5000-row vocabulary above max_preconditioned_dim: no factor, not split."""
    shape = (5000, 64)
    layout = block_layout(shape, block_size=1024, max_preconditioned_dim=4096)
    assert layout.merged_shape == (5000, 64)
    assert layout.preconditioned == (False, True)
    assert layout.preconditioned_dims == (1,)
    assert layout.num_blocks == 1
    assert layout.block_shapes == [(5000, 64)]

    tensor = random_tensor(shape, seed=11, dtype=torch.float32)
    blocks = split_blocks(tensor, layout)
    assert len(blocks) == 1
    assert blocks[0].shape == (5000, 64)
    assert torch.equal(blocks[0], tensor)
    assert torch.equal(merge_blocks(blocks, layout), tensor)


def test_embedding_with_large_max_dim_is_split():
    """The same embedding with max_preconditioned_dim >= 5000 is split into 5 chunks."""
    layout = block_layout((5000, 64), block_size=1024, max_preconditioned_dim=8192)
    assert layout.preconditioned == (True, True)
    assert layout.chunk_sizes == ((1024, 1024, 1024, 1024, 904), (64,))
    tensor = random_tensor((5000, 64), seed=12, dtype=torch.float32)
    blocks = split_blocks(tensor, layout)
    for i, block in enumerate(blocks):
        assert torch.equal(block, tensor[1024 * i:min(1024 * (i + 1), 5000)])


@pytest.mark.parametrize("shape, vector", [
    ((300,), True), ((1, 300, 1), True), ((), True), ((1,), True),
    ((2, 150), False), ((16, 1, 4), False), ((3, 3, 3), False)])
@pytest.mark.parametrize("block_size", [64, 1024])
def test_without_precondition_1d_vectors_get_no_factor_and_stay_whole(shape, vector, block_size):
    """Only parameters with at most one dimension of size > 1 lose their factors (so a
    matrix merged into a vector keeps its one); their blocking is then that of an
    unpreconditioned dimension: one whole block."""
    with_1d = block_layout(shape, block_size, 8192)
    without = block_layout(shape, block_size, 8192, precondition_1d=False)
    assert without.merged_shape == with_1d.merged_shape
    if vector:
        assert not any(without.preconditioned) and without.num_blocks == 1
    else:
        assert without == with_1d
    tensor = random_tensor(shape, seed=13, dtype=torch.float64)
    assert torch.equal(merge_blocks(split_blocks(tensor, without), without), tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_round_trip_preserves_dtype(dtype):
    tensor = random_tensor((6, 9, 5), seed=5).to(dtype)
    layout = block_layout(tensor.shape, 4, 40)
    blocks = split_blocks(tensor, layout)
    assert all(block.dtype == dtype for block in blocks)
    merged = merge_blocks(blocks, layout)
    assert merged.dtype == dtype
    assert torch.equal(merged, tensor)


def test_non_contiguous_input_round_trips():
    base = random_tensor((7, 12, 5), seed=21)
    tensor = base.permute(2, 0, 1)  # (5, 7, 12), not contiguous
    assert not tensor.is_contiguous()
    layout = block_layout(tensor.shape, 6, 100)
    blocks = split_blocks(tensor, layout)
    merged, slices = reference_block_slices(tuple(tensor.shape), 6, 100)
    reshaped = tensor.reshape(merged)
    for block, index in zip(blocks, slices):
        assert torch.equal(block, reshaped[index])
    assert torch.equal(merge_blocks(blocks, layout), tensor)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout_shape, tensor_shape", [
    ((4, 5), (5, 4)),
    ((4, 5), (20,)),
    ((4, 5), (4, 5, 1)),
    ((), (1,)),
    ((3,), ()),
])
def test_split_blocks_shape_mismatch_raises(layout_shape, tensor_shape):
    layout = block_layout(layout_shape, 4, 16)
    with pytest.raises(ValueError, match="does not match the layout"):
        split_blocks(torch.zeros(tensor_shape), layout)


@pytest.mark.parametrize("delta", [-1, 1, -100])
def test_merge_blocks_wrong_block_count_raises(delta):
    layout = block_layout((10, 7), 4, 100)  # 6 blocks
    blocks = split_blocks(random_tensor((10, 7), seed=1), layout)
    count = max(len(blocks) + delta, 0)
    wrong = (blocks + blocks)[:count]
    with pytest.raises(ValueError, match=f"expected 6 blocks, got {count}"):
        merge_blocks(wrong, layout)


# ---------------------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------------------

MAX_NUMEL = 20_000  # keeps every example cheap


@st.composite
def shapes(draw):
    """0 to 5 dimensions of sizes 1..40 (1s frequent), numel capped at MAX_NUMEL."""
    ndim = draw(st.integers(0, 5))
    shape = []
    numel = 1
    for _ in range(ndim):
        cap = min(40, MAX_NUMEL // numel)
        size = draw(st.one_of(st.just(1), st.integers(1, cap)))
        shape.append(size)
        numel *= size
    return tuple(shape)


configs = st.fixed_dictionaries({
    "shape": shapes(),
    "block_size": st.integers(1, 64),
    "max_dim": st.integers(1, 80),
    "seed": st.integers(0, 2**31 - 1),
})


@settings(max_examples=300, deadline=None)
@given(config=configs)
def test_layout_properties(config):
    shape, block_size, max_dim = config["shape"], config["block_size"], config["max_dim"]
    layout = block_layout(shape, block_size, max_dim)
    numel = math.prod(shape)

    assert layout.param_shape == shape
    assert layout.merged_shape == reference_merged_shape(shape, block_size)
    assert math.prod(layout.merged_shape) == numel
    assert 1 not in layout.merged_shape
    assert len(layout.chunk_sizes) == len(layout.merged_shape) == len(layout.preconditioned)
    for size, chunks, pre in zip(layout.merged_shape, layout.chunk_sizes,
                                 layout.preconditioned):
        assert sum(chunks) == size
        if pre:
            assert size <= max_dim
            assert all(1 <= c <= block_size for c in chunks)
            assert all(c == block_size for c in chunks[:-1])  # only the last may be smaller
        else:
            assert size > max_dim
            assert chunks == (size,)  # whole, one chunk
    assert layout.num_blocks == math.prod(len(c) for c in layout.chunk_sizes)
    assert sum(math.prod(s) for s in layout.block_shapes) == numel


@settings(max_examples=300, deadline=None)
@given(config=configs)
def test_split_merge_round_trip_and_contents(config):
    shape, block_size, max_dim = config["shape"], config["block_size"], config["max_dim"]
    tensor = random_tensor(shape, config["seed"])
    layout = block_layout(shape, block_size, max_dim)
    blocks = split_blocks(tensor, layout)

    assert [tuple(b.shape) for b in blocks] == layout.block_shapes
    assert len(blocks) == layout.num_blocks
    assert sum(b.numel() for b in blocks) == tensor.numel()
    for block in blocks:
        for dim in layout.preconditioned_dims:
            assert block.shape[dim] <= block_size

    # contents against explicit slicing of the reshaped tensor
    merged, slices = reference_block_slices(shape, block_size, max_dim)
    reshaped = tensor.reshape(merged)
    assert len(slices) == len(blocks)
    for block, index in zip(blocks, slices):
        assert torch.equal(block, reshaped[index])

    restored = merge_blocks(blocks, layout)
    assert restored.shape == tensor.shape
    assert torch.equal(restored, tensor)


@settings(max_examples=200, deadline=None)
@given(config=configs)
def test_split_blocks_are_views_of_contiguous_input(config):
    shape, block_size, max_dim = config["shape"], config["block_size"], config["max_dim"]
    tensor = random_tensor(shape, config["seed"])
    original = tensor.clone()
    layout = block_layout(shape, block_size, max_dim)
    blocks = split_blocks(tensor, layout)

    # write a different offset into every block, in place
    for i, block in enumerate(blocks):
        assert block.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        block.add_(1000.0 * (i + 1))

    merged, slices = reference_block_slices(shape, block_size, max_dim)
    expected = original.reshape(merged)
    for i, index in enumerate(slices):
        expected[index] += 1000.0 * (i + 1)
    assert torch.equal(tensor.reshape(merged), expected)


# ---------------------------------------------------------------------------------------
# Zero-size parameters: an empty dimension is one empty chunk
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (3, 0), (2, 0, 3)])
def test_zero_size_parameter_round_trips(shape):
    tensor = torch.zeros(shape)
    layout = block_layout(shape, 4, 8)
    blocks = split_blocks(tensor, layout)
    assert len(blocks) == layout.num_blocks
    assert torch.equal(merge_blocks(blocks, layout), tensor)


# ---------------------------------------------------------------------------------------
# Regions: equal-block boxes gathered with one strided view (the optimizer's fast path)
# ---------------------------------------------------------------------------------------


def _region_blocks(merged, region):
    return region_view(merged, region).reshape(region.num_blocks, *region.block_shape)


@settings(max_examples=300, deadline=None)
@given(config=configs, one_block_each=st.booleans(), transposed=st.booleans())
def test_regions_tile_the_layout_and_match_split_blocks(config, one_block_each, transposed):
    """Every block appears in exactly one region, with the contents split_blocks gives,
    for contiguous and non-contiguous merged tensors; a parameter has at most 2^k
    regions (one per block with one_block_each)."""
    layout = block_layout(config["shape"], config["block_size"], config["max_dim"])
    gen = torch.Generator().manual_seed(config["seed"])
    tensor = torch.randn(config["shape"], generator=gen)
    merged = tensor.reshape(layout.merged_shape)
    if transposed and merged.dim() >= 2:  # same values, non-contiguous strides
        merged = merged.mT.contiguous().mT
    blocks = split_blocks(tensor, layout)
    regions = block_regions(layout, one_block_each=one_block_each)
    seen = []
    for region in regions:
        assert all(s == region.block_shape for s in
                   [layout.block_shapes[i] for i in region.block_indices])
        for block, index in zip(_region_blocks(merged, region), region.block_indices):
            assert torch.equal(block, blocks[index])
            seen.append(index)
    assert sorted(seen) == list(range(layout.num_blocks))
    if numel(config["shape"]) > 0:
        limit = layout.num_blocks if one_block_each else 2 ** len(layout.merged_shape)
        assert len(regions) <= limit


def numel(shape):
    return math.prod(shape)


@pytest.mark.parametrize("transposed", [False, True])
def test_region_view_writes_through(transposed):
    layout = block_layout((10, 7), 4, 100)
    merged = torch.zeros(10, 7) if not transposed else torch.zeros(7, 10).mT
    for value, region in enumerate(block_regions(layout), start=1):
        region_view(merged, region).fill_(value)
    expected = torch.zeros(10, 7)
    expected[:8, :4], expected[:8, 4:], expected[8:, :4], expected[8:, 4:] = 1, 2, 3, 4
    assert torch.equal(merged, expected)


def test_many_blocks_are_one_region():
    layout = block_layout((64, 48), 8, 100)
    regions = block_regions(layout)
    assert len(regions) == 1 and regions[0].counts == (8, 6)
    assert regions[0].num_blocks == layout.num_blocks == 48
