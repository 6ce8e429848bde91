"""Evaluations of trained LMs: needle in a haystack and perplexity on text (``text``), the multimodal needle
(``needle_image``), their report files (``report``) and the BYOL-vs-random VLM demo (``multimodal_demo``)."""
