"""The TorchScript-free reader of CLIP release files equals ``torch.jit.load(path).state_dict()`` to the bit, and
never runs what an archive names."""

import collections
import os
import warnings
import zipfile
from typing import Optional

import pytest
import torch
from torch import nn

from cascade_clip import clip_arch
from cascade_clip.clip_arch import create_clip, read_clip_state_dict
from cascade_clip.torchscript_weights import (
    TorchScriptArchiveError, is_torchscript_archive, read_torchscript_state_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit:FutureWarning",
                                        "ignore:.*torch.jit:DeprecationWarning")


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """OpenAI's residual attention block: nn.MultiheadAttention, an OrderedDict MLP, a plain-attribute mask."""

    def __init__(self, width: int, heads: int, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict(
            [("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # not a buffer: state_dict leaves it out

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAILayoutCLIP(nn.Module):
    """The layout of OpenAI's CLIP release files at toy size, in float16 like them, with their int buffers."""

    def __init__(self, width: int = 32, patch: int = 8, size: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.resblocks = nn.Sequential(*[Block(width, 4) for _ in range(2)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, 16))
        self.text_blocks = nn.Sequential(Block(width, 4, attn_mask=torch.full((5, 5), float("-inf")).triu(1)))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        for name, value in (("input_resolution", size), ("context_length", 5), ("vocab_size", 99)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image):
        x = self.conv1(image).flatten(2).permute(2, 0, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(1, x.shape[1], x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x]) + self.positional_embedding.to(x.dtype)[:, None]
        x = self.resblocks(self.ln_pre(x))
        return self.ln_post(x[0]) @ self.proj


class Zoo(nn.Module):
    """Storage and attribute cases a reader could get wrong (scripted: the class sources carry the lists)."""

    def __init__(self):
        super().__init__()
        self.no_bias = nn.Linear(6, 5, bias=False)
        self.tied = nn.Linear(6, 5, bias=False)
        self.tied.weight = self.no_bias.weight  # one storage, two names
        self.layers = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 3)])
        self.norm = nn.BatchNorm1d(3)  # float and int64 buffers
        self.register_buffer("scratch", torch.ones(3), persistent=False)
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.transposed = nn.Parameter(torch.randn(4, 7).t())  # not contiguous
        self.fp16 = nn.Parameter(torch.randn(3, 2).half())
        self.bf16 = nn.Parameter(torch.randn(2, 3).bfloat16())
        self.empty = nn.Parameter(torch.empty(0, 4))
        self.threshold = 0.5

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) + self.scratch + self.threshold


class OddNames(nn.Module):
    """Names TorchScript prints unescaped (a ']' inside the __parameters__ line) or as __annotations__[...] items."""

    def __init__(self):
        super().__init__()
        self.register_parameter("w]x", nn.Parameter(torch.randn(2)))
        self.plain = nn.Parameter(torch.randn(2))
        self.register_buffer("b]y", torch.randn(2))

    def forward(self, x):
        return x + getattr(self, "w]x") + self.plain + getattr(self, "b]y")


class OptionalBuffer(nn.Module):
    """A buffer declared Optional[Tensor]: TorchScript's buffer policy leaves it out of state_dict."""

    maybe: Optional[torch.Tensor]

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))
        self.register_buffer("maybe", torch.randn(3))

    def forward(self, x):
        return x + self.weight


class Settings:
    def __init__(self, scale: float):
        self.scale = scale


with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.script (a warning at import, outside the marks)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    Settings = torch.jit.script(Settings)


class WithSettings(nn.Module):
    """A module holding a TorchScript class instance (`class Settings:` in the archive's source, no base)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.settings = Settings(2.0)

    def forward(self, x):
        return self.linear(x) * self.settings.scale


class OwnState(nn.Module):
    """Pickled through its own __getstate__: its tensors are not where the class's slots say."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.weight = state[0]
        self.training = state[1]


class NegatedView(nn.Module):
    """A buffer that is a lazily negated view (math bits): stored values and tensor values differ."""

    def __init__(self):
        super().__init__()
        self.register_buffer("imag", torch.randn(3, dtype=torch.cfloat).conj().imag)

    def forward(self, x):
        return x + self.imag


def _assert_same_state(path):
    ours = read_torchscript_state_dict(str(path))
    theirs = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert list(ours) == list(theirs)
    for key, want in theirs.items():
        got = ours[key]
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == \
            (want.dtype, want.shape, want.stride(), want.storage_offset()), key
        assert torch.equal(got, want), key
    return ours


def test_openai_layout_fp16_traced_equals_jit_load(tmp_path):
    torch.manual_seed(0)
    model = OpenAILayoutCLIP().eval()
    path = tmp_path / "ViT-toy.pt"
    torch.jit.trace(model, torch.randn(1, 3, 16, 16)).save(str(path))  # traced in float32 ...
    model.half()  # ... and in float16, as OpenAI released them (conv1, attention, MLP and proj weights)
    half_path = tmp_path / "ViT-toy-fp16.pt"
    torch.jit.script(model).save(str(half_path))
    for p in (path, half_path):
        assert is_torchscript_archive(str(p))
        state = _assert_same_state(p)
        assert {"input_resolution", "resblocks.1.attn.in_proj_weight", "resblocks.0.mlp.c_fc.bias"} <= set(state)
        assert not any(k.endswith("attn_mask") for k in state)
    assert read_torchscript_state_dict(str(half_path))["conv1.weight"].dtype == torch.float16


def test_storage_and_attribute_cases_equal_jit_load(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(path))
    state = _assert_same_state(path)
    # as in torch.jit's state_dict: TorchScript keeps no persistence flag, so the non-persistent buffer is there too
    assert "scratch" in state and "no_bias.bias" not in state
    assert state["norm.num_batches_tracked"].dtype == torch.int64
    assert state["tied.weight"].data_ptr() == state["no_bias.weight"].data_ptr()


def test_open_clip_archive_loads_without_torchscript(tmp_path, monkeypatch):
    torch.manual_seed(2)
    source = create_clip("cascade-tiny").eval()
    path = tmp_path / "tiny-openai-format.pt"
    torch.jit.trace_module(source, {"encode_image": torch.randn(1, 3, 64, 64)}).save(str(path))
    _assert_same_state(path)

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the normal path says nothing (no deprecation of jit.load, no fallback)
        state = read_clip_state_dict(str(path))
    for key, value in source.state_dict().items():
        if key != "attn_mask":
            assert torch.equal(state[key], value), key
    loaded = create_clip("cascade-tiny", str(path))
    assert torch.equal(loaded.visual.conv1.weight, source.visual.conv1.weight)


def _rewrite(path, out, record_suffix, data):
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, data if item.filename.endswith(record_suffix) else src.read(item.filename))


def test_archive_globals_are_never_run(tmp_path):
    path = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(path))
    marker = tmp_path / "ran"
    # a data.pkl whose root is os.system("touch ran"): refused by name, nothing executed
    payload = b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little") + \
        f"touch {marker}".encode() + b"\x85R."
    evil = tmp_path / "evil.pt"
    _rewrite(path, evil, "/data.pkl", payload)
    with pytest.raises(TorchScriptArchiveError, match=r"evil\.pt: data\.pkl names os\.system"):
        read_torchscript_state_dict(str(evil))
    assert not marker.exists()


def test_damaged_archives_are_named(tmp_path):
    path = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(path))
    with zipfile.ZipFile(path) as archive:
        record = sorted(n for n in archive.namelist() if "/data/" in n)[0]
    short = tmp_path / "short.pt"
    _rewrite(path, short, record, b"\x00" * 3)
    with pytest.raises(TorchScriptArchiveError, match=r"short\.pt: storage .*/data/\d+ holds 3 bytes"):
        read_torchscript_state_dict(str(short))

    saved = tmp_path / "saved.pt"
    torch.save({"w": torch.ones(2)}, saved)  # a torch.save zip: no code/, not TorchScript
    assert not is_torchscript_archive(str(saved))
    with pytest.raises(TorchScriptArchiveError, match="not TorchScript"):
        read_torchscript_state_dict(str(saved))
    text = tmp_path / "notes.pt"
    text.write_text("not a zip")
    with pytest.raises(TorchScriptArchiveError, match="not a zip file"):
        read_torchscript_state_dict(str(text))


def test_unreadable_archive_falls_back_to_jit_load_with_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(path))
    want = torch.jit.load(str(path)).state_dict()

    def refuse(p):
        raise TorchScriptArchiveError(f"{p}: refused for the test")

    monkeypatch.setattr(clip_arch, "read_torchscript_state_dict", refuse)
    with pytest.warns(UserWarning, match=r"refused for the test; reading it with torch\.jit\.load instead"):
        state = read_clip_state_dict(str(path))
    assert list(state) == list(want) and all(torch.equal(state[k], want[k]) for k in want)
    assert os.path.isfile(path)


def test_printed_source_corner_cases_equal_jit_load(tmp_path):
    torch.manual_seed(4)
    for name, module in (("odd.pt", OddNames()), ("optional.pt", OptionalBuffer()), ("settings.pt", WithSettings())):
        path = tmp_path / name
        torch.jit.script(module).save(str(path))
        state = _assert_same_state(path)
    assert list(read_torchscript_state_dict(str(tmp_path / "odd.pt"))) == ["w]x", "plain", "b]y"]
    assert list(read_torchscript_state_dict(str(tmp_path / "optional.pt"))) == ["weight"]
    assert set(state) == {"linear.weight", "linear.bias"}


def test_archives_the_reader_cannot_take_are_refused_by_reason(tmp_path):
    cases = ((OwnState(), "own __getstate__"), (NegatedView(), "rebuild metadata {'neg': True}"))
    for i, (module, reason) in enumerate(cases):
        path = tmp_path / f"case{i}.pt"
        torch.jit.script(module).save(str(path))
        with pytest.raises(TorchScriptArchiveError, match=f"case{i}\\.pt: .*{reason}"):
            read_torchscript_state_dict(str(path))
    legacy = tmp_path / "legacy.pt"  # torch <= 1.2 wrote model.json and tensors/: left to torch.jit.load
    with zipfile.ZipFile(legacy, "w") as archive:
        archive.writestr("legacy/model.json", "{}")
        archive.writestr("legacy/tensors/0", b"")
    assert is_torchscript_archive(str(legacy))
    with pytest.raises(TorchScriptArchiveError, match=r"legacy\.pt: a TorchScript archive of torch <= 1\.2"):
        read_torchscript_state_dict(str(legacy))


def test_a_damaged_archive_is_a_value_error_naming_both_readers(tmp_path):
    path = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(path))
    damaged = tmp_path / "damaged.pt"  # one storage record missing: neither reader can take it
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        dropped = sorted(n for n in src.namelist() if "/data/" in n)[0]
        for item in src.infolist():
            if item.filename != dropped:
                dst.writestr(item, src.read(item.filename))
    with pytest.warns(UserWarning, match="is missing; reading it with torch.jit.load instead"):
        with pytest.raises(ValueError, match=r"damaged\.pt: storage record .* is missing; torch\.jit\.load cannot "
                                             r"read it either"):
            read_clip_state_dict(str(damaged))
