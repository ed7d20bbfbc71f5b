"""Test-only extension for the host suites (tests/webui, tests/forge; linked into the WebUI's extensions/ by the
suites, never installed by users): gives each image of a batch its own prompt, which the HTTP API cannot, so a suite
can sample an image alone and in a batch with other prompts. Its one argument is a JSON list of prompts, one per
image of the request (batch size x batch count); empty leaves the request's prompt alone."""

import json

import gradio as gr
from modules import scripts

TITLE = "Test prompt list"


class PromptList(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Textbox(value="", label="Prompts (JSON list, one per image)")]

    def before_process(self, p, prompts="", *args, **kwargs):
        """Before the WebUI expands ``p.prompt`` into one prompt per image: a list is taken as those prompts."""
        if prompts:
            values = json.loads(prompts)
            if len(values) != p.batch_size * p.n_iter:
                raise ValueError(f"{TITLE}: {len(values)} prompts for {p.batch_size * p.n_iter} images")
            p.prompt = values
