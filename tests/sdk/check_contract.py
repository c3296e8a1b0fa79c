"""Rendered request lines checked against the official SDKs' own request types (pinned in
scripts/tools-requirements.txt), with unknown keys refused at every level:
  check_contract.py OPENAI_LINES ANTHROPIC_LINES MISTRAL_LINES [CREATES]
- an OpenAI batch line is {custom_id, method: POST, url: /v1/chat/completions, body} and its
  body a `CompletionCreateParamsNonStreaming` of the `openai` SDK;
- an Anthropic line is a `batch_create_params.Request` of the `anthropic` SDK;
- a Mistral line is a `BatchRequest` of the `mistralai` SDK and its body a
  `ChatCompletionRequest` with no key the model does not declare.
- CREATES (JSON: the bodies rowsmith's clients send to create a batch) holds an OpenAI
  `BatchCreateParams` of the `openai` SDK, a Mistral `CreateBatchJobRequest` with no key the
  model does not declare, and a Together `BatchCreateParams` of the `together` SDK.
Exits 1 naming the first line and key that do not fit."""
import importlib
import json
import pkgutil
import sys

import anthropic
import mistralai.client.models as mistral_models
import openai
from pydantic import ConfigDict, TypeAdapter, ValidationError


def forbid_extras(package: str) -> None:
    """Every TypedDict of `package` refuses keys it does not declare (they allow them by
    default, which would let any misspelt parameter through)."""
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        try:
            module = importlib.import_module(info.name)
        except Exception:
            continue
        for value in vars(module).values():
            if isinstance(value, type) and hasattr(value, "__required_keys__"):
                value.__pydantic_config__ = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def check(path: str, validate) -> int:
    count = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                validate(json.loads(line))
            except (ValidationError, ValueError) as error:
                sys.exit(f"{path}:{number}: {error}")
            count += 1
    return count


def check_creates(path: str) -> None:
    """The create bodies, each against its SDK's own parameters, unknown keys refused."""
    forbid_extras("together.types")
    from openai.types.batch_create_params import BatchCreateParams as OpenAiCreate
    from together.types.batch_create_params import BatchCreateParams as TogetherCreate

    with open(path, encoding="utf-8") as file:
        creates = json.load(file)
    try:
        TypeAdapter(OpenAiCreate).validate_python(creates["openai"])
        TypeAdapter(TogetherCreate).validate_python(creates["together"])
        mistral = creates["mistral"]
        model = mistral_models.CreateBatchJobRequest
        declared = {f.alias or name for name, f in model.model_fields.items()}
        unknown = set(mistral) - declared
        if unknown:
            raise ValueError(f"Mistral create keys the SDK does not declare: {sorted(unknown)}")
        model.model_validate(mistral)
    except (ValidationError, ValueError) as error:
        sys.exit(f"{path}: {error}")


def main() -> None:
    forbid_extras("openai.types")
    forbid_extras("anthropic.types")
    from anthropic.types.messages.batch_create_params import Request
    from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming

    chat = TypeAdapter(CompletionCreateParamsNonStreaming)
    request = TypeAdapter(Request)

    def openai_line(line: dict) -> None:
        if set(line) != {"custom_id", "method", "url", "body"}:
            raise ValueError(f"batch line keys {sorted(line)}")
        if line["method"] != "POST" or line["url"] != "/v1/chat/completions":
            raise ValueError(f"method/url {line['method']} {line['url']}")
        chat.validate_python(line["body"])

    def mistral_line(line: dict) -> None:
        mistral_models.BatchRequest.model_validate(line)
        if set(line) != {"custom_id", "body"}:
            raise ValueError(f"batch line keys {sorted(line)}")
        declared = {f.alias or name for name, f in mistral_models.ChatCompletionRequest.model_fields.items()}
        unknown = set(line["body"]) - declared
        if unknown:
            raise ValueError(f"body keys ChatCompletionRequest does not declare: {sorted(unknown)}")
        mistral_models.ChatCompletionRequest.model_validate(line["body"])

    checked = check(sys.argv[1], openai_line)
    checked += check(sys.argv[2], request.validate_python)
    checked += check(sys.argv[3], mistral_line)
    if len(sys.argv) > 4:
        check_creates(sys.argv[4])
        checked += 3
    from importlib.metadata import version
    print(f"checked {checked} lines against openai {openai.__version__}, anthropic "
          f"{anthropic.__version__} and mistralai {version('mistralai')}")


if __name__ == "__main__":
    main()
