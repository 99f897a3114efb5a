"""Every writer puts each component where its layout says, and the loaders look there."""

from bonsai_mlx import layouts
from bonsai_mlx.convert import convert_pipeline
from bonsai_mlx.export import export_bundle
from bonsai_mlx.random_weights import write_random_pack
from test_random_weights import TEXT_LAYERS, TINY


def folders(root):
    return {p.name for p in root.iterdir() if p.is_dir()}


def test_writers_follow_their_layouts(tmp_path):
    pack = write_random_pack(tmp_path / "pack", "binary", **TINY)
    L = layouts.OFFICIAL_PACK
    assert folders(pack) == {L.transformer, L.text_encoder, L.tokenizer, layouts.OUR_PACK.vae}
    ours = convert_pipeline(pack, tmp_path / "ours", "binary")
    assert layouts.OUR_PACK.transformer in folders(ours) and folders(ours) <= {
        getattr(layouts.OUR_PACK, p) for p in ("transformer", "text_encoder", "tokenizer", "vae")}
    b = export_bundle(pack, tmp_path / "bundle", "binary", text_layers=TEXT_LAYERS)
    B = layouts.BUNDLE
    assert folders(b) == {B.transformer, B.text_encoder, B.tokenizer, B.vae, layouts.BUNDLE_KERNELS}


def test_loaders_search_every_layout_once():
    for part, names in (("transformer", layouts.TRANSFORMER_SUBDIRS), ("text_encoder", layouts.ENCODER_SUBDIRS),
                        ("tokenizer", layouts.TOKENIZER_SUBDIRS), ("vae", layouts.VAE_SUBDIRS)):
        assert len(set(names)) == len(names)
        assert set(names) == {getattr(l, part) for l in layouts.LAYOUTS if getattr(l, part)}
    assert layouts.TRANSFORMER_SUBDIRS[0] == layouts.OFFICIAL_PACK.transformer  # a pack's own transformer first


def test_hub_downloads_fetch_every_part_a_pack_copies():
    """What `convert` copies from a model (its parts and root files such as bonsai.json) is
    also what a download of the model fetches, so a model loaded by repo id keeps them."""
    from fnmatch import fnmatch

    from bonsai_mlx.loading import PIPELINE_FILES

    for part in layouts.PACK_COPIED:
        probe = part if part.endswith(".json") else f"{part}/config.json"
        assert any(fnmatch(probe, pattern) for pattern in PIPELINE_FILES), part
