"""Instruction / chat data: render with the tokenizer's chat template, train only on the assistant's answers.

Prompt-loss masking tokenises the prompt (rendered up to the assistant's turn, with the generation prompt) and the
prompt plus answer separately; the label of every prompt token is -100. The end-of-turn / EOS token that closes the
answer stays in the labels, so the model learns to stop (masking by the pad id would hide it for tokenizers whose
pad token is the EOS token, such as SmolLM2's).

Tokenizers without a chat template use this plain template (``{eos}`` is the tokenizer's EOS token)::

    {system}\n\n                       (only when there is a system message)
    ### Instruction:\n{user}\n\n
    ### Response:\n{assistant}{eos}\n\n

Rows with a ``choices`` column (a fixed list of answers, e.g. ``["negative", "positive"]``) also get the token ids of
each choice after the prompt, so that evaluation can score each choice by its log-likelihood. Evaluation rows without
choices keep their prompt alone (``gen_prompt_ids``, the prompt of the last answer, untruncated) and the answer's text
(``reference``), so that evaluation can generate an answer and score its text (``lightning_ft.evaluation``).
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import PreTrainedTokenizerBase

from lightning_ft.data.formats import EncodedSplit, Example, describe_value, require_columns, require_text

Message = dict[str, str]


def render_plain(messages: list[Message], eos_token: str, add_generation_prompt: bool) -> str:
    """Render ``messages`` with the plain template documented in this module."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}{eos_token}\n\n")
        else:
            parts.append(f"### Instruction:\n{m['content']}\n\n")
    if add_generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


class InstructionFormat:
    """Rows with a ``messages`` column (chat format) or ``prompt`` / ``response`` columns."""

    model_task = "causal_lm"

    def __init__(
        self,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str = "messages",
        choices_column: str = "choices",
        system_prompt: str | None = None,
    ) -> None:
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.messages_column = messages_column
        self.choices_column = choices_column
        self.system_prompt = system_prompt

    # ---- rendering -------------------------------------------------------------------------------------------
    def messages(self, row: dict, with_answer: bool = True) -> list[Message]:
        """The chat messages of ``row``; without the final answer when ``with_answer`` is False."""
        if self._is_chat(row):
            msgs = [dict(role=m["role"], content=m["content"]) for m in row[self.messages_column]]
            if not with_answer and msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
        else:
            msgs = [{"role": "user", "content": row[self.prompt_column]}]
            if with_answer:
                msgs.append({"role": "assistant", "content": row[self.response_column]})
        if self.system_prompt is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def tokenize(
        self, tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool
    ) -> list[int]:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        text = render_plain(messages, tokenizer.eos_token, add_generation_prompt)
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    # ---- validation ------------------------------------------------------------------------------------------
    def _check_rows(self, rows: list[dict], split: str, with_answer: bool) -> None:
        """Each row needs a well-formed messages column, or a prompt column (and a response column when training);
        every text is a string."""
        columns = [self.prompt_column] + ([self.response_column] if with_answer else [])
        for idx, row in enumerate(rows):
            # a null messages column is an absent one (datasets and Parquet fill columns a row lacks with None)
            if self._is_chat(row) or (self.messages_column in row and self.prompt_column not in row):
                self._check_messages(row[self.messages_column], f"{split} row {idx}", with_answer)
            else:
                require_columns([row], columns, split, first_row=idx)
                require_text([row], columns, split, first_row=idx)

    def _check_messages(self, msgs: object, where: str, with_answer: bool) -> None:
        col = self.messages_column
        example = "[{'role': 'user', 'content': '...'}, {'role': 'assistant', 'content': '...'}]"
        if not isinstance(msgs, (list, tuple)):
            hint = " (CSV cannot hold lists: use JSONL or Parquet for chat rows)" if isinstance(msgs, str) else ""
            raise ValueError(f"{where}: `{col}` is {describe_value(msgs)}, not a list of turns like {example}{hint}")
        if not msgs:
            raise ValueError(f"{where}: `{col}` is empty; a chat row needs at least a user turn. Drop the row.")
        for t, turn in enumerate(msgs):
            if not isinstance(turn, Mapping):
                raise ValueError(f"{where}: turn {t} of `{col}` is {describe_value(turn)}, not a dict like {example}")
            missing = [k for k in ("role", "content") if k not in turn]
            if missing:
                hint = " (ShareGPT-style 'from' / 'value' turns must be renamed)" if "from" in turn else ""
                raise ValueError(
                    f"{where}: turn {t} of `{col}` has no {' and no '.join(repr(k) for k in missing)} (its keys are "
                    f"{sorted(turn)}); every turn needs 'role' and 'content'{hint}. Fix the turn or drop the row."
                )
            for key in ("role", "content"):
                if not isinstance(turn[key], str):
                    raise ValueError(
                        f"{where}: turn {t} of `{col}`: '{key}' is {describe_value(turn[key])}, not a string. "
                        "Fill it in (as text) or drop the row."
                    )
        if with_answer and msgs[-1]["role"] != "assistant":
            raise ValueError(
                f"{where}: the last turn of `{col}` must be the assistant's answer (the text trained on), got role "
                f"{msgs[-1]['role']!r}. End the conversation with an assistant turn or drop the row."
            )

    # ---- encoding --------------------------------------------------------------------------------------------
    def encode_row(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> Example:
        """Token ids and labels of one row, untruncated. Every assistant turn is trained on."""
        msgs = self.messages(row)
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the assistant's answer, got role {msgs[-1]['role']!r}")
        input_ids = self.tokenize(tokenizer, msgs, add_generation_prompt=False)
        labels = [-100] * len(input_ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self.tokenize(tokenizer, msgs[:i], add_generation_prompt=True)
            start = len(prompt)
            upto = input_ids if i == len(msgs) - 1 else self.tokenize(tokenizer, msgs[: i + 1], False)
            if input_ids[:start] != prompt or input_ids[: len(upto)] != upto:
                raise ValueError(
                    "the prompt's tokens are not a prefix of the full example's tokens (the chat template or the "
                    "tokenizer merges across the prompt/answer boundary), so the prompt cannot be masked exactly; "
                    "end prompts with a newline or pass single-turn rows"
                )
            labels[start : len(upto)] = input_ids[start : len(upto)]
        return {"input_ids": input_ids, "labels": labels, "prompt_length": start}

    def encode(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, split: str) -> EncodedSplit:
        self._check_rows(rows, split, with_answer=True)
        examples, truncated = [], 0
        for idx, row in enumerate(rows):
            ex = self.encode_row(row, tokenizer)
            prompt_length = ex.pop("prompt_length")
            if prompt_length >= max_length:
                raise ValueError(
                    f"{split} row {idx}: the prompt alone is longer than max_length={max_length}, so no answer token "
                    "would be trained on. Raise max_length or shorten / filter long prompts."
                )
            if len(ex["input_ids"]) > max_length:
                truncated += 1
                ex = {k: v[:max_length] for k, v in ex.items()}
            if self.choices_column in row and split != "train":  # choices are only scored in evaluation
                ex.update(self.encode_choices(row, tokenizer, max_length, f"{split} row {idx}"))
            elif split != "train":  # free-text answers: evaluation may generate from the prompt and score the text
                ex["gen_prompt_ids"] = ex["input_ids"][:prompt_length]
                ex["reference"] = self.messages(row)[-1]["content"]
            examples.append(ex)
        return EncodedSplit(examples, truncated)

    def encode_for_predict(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
        self._check_rows(rows, "predict", with_answer=False)
        examples = []
        for idx, row in enumerate(rows):
            ids = self.tokenize(tokenizer, self.messages(row, with_answer=False), add_generation_prompt=True)
            if len(ids) > max_length:
                raise ValueError(
                    f"predict row {idx}: the prompt has {len(ids)} tokens, more than max_length={max_length}"
                )
            examples.append({"input_ids": ids})
        return EncodedSplit(examples)

    def encode_choices(self, row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, where: str) -> Example:
        """``choice_ids``: per choice, the answer tokens after the prompt (up to the first EOS); ``choice_label``."""
        if not isinstance(row[self.choices_column], (list, tuple)) or len(row[self.choices_column]) < 2:
            raise ValueError(
                f"{where}: `{self.choices_column}` must be a list of at least two answers, got "
                f"{row[self.choices_column]!r} (CSV cannot hold lists: use JSONL or Parquet for rows with choices)"
            )
        choices = [str(c) for c in row[self.choices_column]]
        prompt_msgs = self.messages(row, with_answer=False)
        prompt = self.tokenize(tokenizer, prompt_msgs, add_generation_prompt=True)
        choice_ids = []
        for c in choices:
            full = self.tokenize(tokenizer, prompt_msgs + [{"role": "assistant", "content": c}], False)
            cont = full[len(prompt) :]
            if tokenizer.eos_token_id in cont:
                cont = cont[: cont.index(tokenizer.eos_token_id) + 1]
            if len(prompt) + len(cont) > max_length:
                raise ValueError(f"{where}: prompt plus choice {c!r} is longer than max_length={max_length}")
            choice_ids.append(cont)
        answer = self.messages(row)[-1]["content"] if self._has_answer(row) else None
        if answer is not None and answer not in choices:
            raise ValueError(f"{where}: the answer {answer!r} is not one of the choices {choices}")
        return {
            "prompt_ids": prompt,
            "choice_ids": choice_ids,
            "choice_label": choices.index(answer) if answer is not None else -100,
        }

    def _is_chat(self, row: dict) -> bool:
        return row.get(self.messages_column) is not None

    def _has_answer(self, row: dict) -> bool:
        if self._is_chat(row):
            return bool(row[self.messages_column]) and row[self.messages_column][-1]["role"] == "assistant"
        return self.response_column in row
