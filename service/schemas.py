"""Typed request options and replies (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from service.errors import BadOptions
from service.numbers import parse_decimal, parse_int

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


def _ascii_number(parse: Callable[[str], Any], what: str) -> BeforeValidator:
    """Form fields and query parameters are text: read them with the service's one number parser
    (service/numbers.py), not pydantic's lenient one (`" 3 "`, `"1_0"`, `"+3"`, 20-digit top_k)."""

    def check(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        number = parse(value)
        if number is None:
            raise ValueError(f"must be {what} in ASCII digits")
        return number

    return BeforeValidator(check)


Count = Annotated[int, _ascii_number(parse_int, "a whole number")]
Decimal = Annotated[float, _ascii_number(parse_decimal, "a decimal number")]


class ClassifyOptions(BaseModel):
    """Per-request options, from multipart form fields or query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: Decimal | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                 description="most expected compute, as a fraction of the full model's MACs")
    threshold: Decimal | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="expert override of the entropy threshold θ (not with budget)")
    min_accuracy: Decimal | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                       description="floor on the calibrated expected accuracy: alone, the cheapest "
                                                   "point that meets it; with budget, the most accurate point within "
                                                   "the budget, which must meet it (422 unsatisfiable otherwise)")
    max_exit: Count | None = Field(None, ge=0, description="hard cap: never run past this exit (0-based)")
    top_k: Count = Field(3, ge=1, description="how many classes to list")
    model: str | None = Field(None, pattern=MODEL_NAME, description="model name; default: the server's")
    timeout_ms: Decimal | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="answer 504 past this many ms (the server's limit still applies)")

    @model_validator(mode="after")
    def _one_of_budget_or_threshold(self) -> ClassifyOptions:
        if self.budget is not None and self.threshold is not None:
            raise ValueError("give either budget or threshold, not both")
        if self.min_accuracy is not None and self.threshold is not None:
            raise ValueError("min_accuracy is a floor on the calibrated operating points and a threshold bypasses "
                             "them: give min_accuracy alone or with budget")
        if self.min_accuracy is not None and self.max_exit is not None:
            raise ValueError("min_accuracy cannot be promised under max_exit: the calibration did not measure capped "
                             "depths; give min_accuracy alone or with budget")
        return self


def parse_options(fields: dict[str, str]) -> ClassifyOptions:
    """Validate raw string fields; every problem becomes one 422 naming the field."""
    try:
        return ClassifyOptions.model_validate(fields)
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        raise BadOptions("; ".join(parts)) from None


# The reply: one type, built by the pipeline, written by orjson (dataclasses natively, no validation on the
# hot path), read by the Open Inference Protocol's encoder, and documented in OpenAPI from these fields.

@dataclass(slots=True)
class TopClass:
    label: str
    class_id: int
    probability: float


@dataclass(slots=True)
class Latency:
    decode: float
    queue: float
    inference: float
    total: float


@dataclass(slots=True)
class ClassifyReply:
    model: str
    version: str
    label: str
    class_id: int
    confidence: float
    top_k: list[TopClass]
    exit: Annotated[int, Field(description="0-based exit that answered")]
    exits: Annotated[int, Field(description="number of exits the model has")]
    entropy: Annotated[float, Field(description="softmax entropy (nats) at the answering exit")]
    threshold: Annotated[float, Field(description="θ used")]
    budget: Annotated[float | None, Field(description="budget used (null when a threshold was given): the one "
                                                      "asked for, a cheaper one when degraded, the point's "
                                                      "expected MACs fraction when only min_accuracy was given")]
    budget_clamped: Annotated[bool, Field(description="true when the budget was below the cheapest operating point")]
    max_exit: int | None
    min_accuracy: Annotated[float | None, Field(description="the accuracy floor asked for (null when not given)")]
    requested_budget: Annotated[float | None, Field(description="budget asked for (the server default when none; "
                                                                "null when a threshold or only min_accuracy was "
                                                                "given)")]
    degraded: Annotated[bool, Field(description="true when answered at a cheaper operating point than asked, "
                                                "under load")]
    expected_accuracy: Annotated[float, Field(description="accuracy to expect at the operating point used: the "
                                                          "live estimate or the calibrated one, as accuracy_source "
                                                          "says")]
    expected_accuracy_offline: Annotated[float, Field(description="calibrated (validation split) accuracy of the "
                                                                  "point")]
    expected_accuracy_live: Annotated[float | None, Field(description="label-free estimate on today's images (shadow "
                                                                      "passes, docs/budgets.md); null until there is "
                                                                      "a window of evidence")]
    accuracy_source: Annotated[str, Field(description="'live' when the live estimate differs from the calibrated "
                                                      "one by more than ERDE_DRIFT_MARGIN plus its noise, else "
                                                      "'offline'")]
    macs: Annotated[int, Field(description="multiply-accumulates spent on this image")]
    macs_fraction: Annotated[float, Field(description="macs / full-depth MACs")]
    latency_ms: Latency


class BatchReply(BaseModel):
    results: list[ClassifyReply]


class OperatingPointOut(BaseModel):
    budget: float
    threshold: float
    expected_accuracy: float
    expected_macs_fraction: float


class ModelInfo(BaseModel):
    name: str
    version: str
    versions: list[str]
    classes: list[str]
    input: dict
    arch: str
    exits: int
    macs_per_exit: list[int]
    test_metrics: dict | None
    calibration: list[OperatingPointOut]
    live_calibration: list[dict] = Field([], description="the operating points in use, as today's replies measure "
                                         "them: live θ, realized MACs fraction and live accuracy beside the "
                                         "calibrated figures (docs/budgets.md)")
    device: str = Field("cpu", description="where the model's inference process runs the network (ERDE_DEVICE)")
    exit_latency: dict | None = Field(None, description="latency per exit measured at export: `ms` maps a batch "
                                      "size to one median time per exit; where, how and when (null before it existed)")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorReply(BaseModel):
    error: ErrorBody
