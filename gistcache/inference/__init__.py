"""Running a model over gist caches: `compression` (an instruction -> a `GistCache`), `generation` (answers from
caches in one batch, the masked reference, the causal baselines) and `decoding` (what every generation path
shares: the decoding settings, greedy decoding written out, the context check)."""
