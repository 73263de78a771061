"""Site names: built and parsed in one place, one error for a bad name, TransformerLens' short names."""

from __future__ import annotations

import pytest

from hooked_gdn.sites import Site, act_name, block_name, gdn_hook_name, parse_site, site_name


def test_names_round_trip():
    assert site_name(4, "state") == gdn_hook_name(4, "hook_state") == "blocks.4.linear_attn.hook_state"
    assert site_name(4, "write") == "blocks.4.linear_attn.hook_write_value"
    assert block_name(2, "ln1.hook_scale") == "blocks.2.ln1.hook_scale"
    for layer in (0, 13):
        for kind in ("state", "write"):
            site = parse_site(site_name(layer, kind))
            assert site == Site(layer, kind) and site.name == site_name(layer, kind)
    assert Site(3, "write").hook_name("hook_write_key") == "blocks.3.linear_attn.hook_write_key"
    with pytest.raises(ValueError, match="a site's kind is one of"):
        site_name(1, "hook_state")


@pytest.mark.parametrize("bad", ["blocks.4.hook_resid_post", "blocks.4.linear_attn.hook_write_key", "blocks.x.linear_attn.hook_state",
                                 "state", None, "blocks.3.linear_attn.hook_state"])
def test_a_bad_site_gets_one_error_that_lists_the_sites(bad):
    with pytest.raises(ValueError) as error:
        parse_site(bad, gdn_layers=[0, 4])
    assert str(error.value) == (f"{bad!r} is not an SAE site; the sites are blocks.0.linear_attn.hook_state, "
                                "blocks.0.linear_attn.hook_write_value, blocks.4.linear_attn.hook_state, "
                                "blocks.4.linear_attn.hook_write_value")
    if bad != "blocks.3.linear_attn.hook_state":  # without the model's layers, any layer is a GDN layer
        with pytest.raises(ValueError, match="the sites are blocks.<L>.linear_attn.hook_state or"):
            parse_site(bad)


def test_short_names():
    assert act_name("state", 4, gdn_layers=[4]) == "blocks.4.linear_attn.hook_state"
    assert act_name("q", 4, gdn_layers=[4]) == "blocks.4.linear_attn.hook_q"
    assert act_name("q", 3, gdn_layers=[4]) == "blocks.3.attn.hook_q"  # an attention layer: TransformerLens' name
    assert act_name("resid_post", 4, gdn_layers=[4]) == "blocks.4.hook_resid_post"
    assert act_name("scale", 4, "ln2", gdn_layers=[4]) == "blocks.4.ln2.hook_scale"
    assert act_name("embed") == "hook_embed"
