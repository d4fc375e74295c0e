"""Field constraints that hold the same on every side: a Python test for pydantic and a CEL twin for the
CRD, with one message (docs/spec.md, "Validation").

`Check(test, rule, message)` in a field's `Annotated[...]` metadata makes pydantic run `test` after the
type check and puts `{rule, message}` into the field's JSON schema as `x-kubernetes-validations`, which
the CRD generator (`python -m wrpo_operator.crd`) copies unchanged. So a field typed `Quantity` or
`StorageUri` is refused with the same words by `wrpo spec validate`, `wrpo run`, the stage pods and the
apiserver. Regular expressions are written once, in the syntax Python's `re` and Go's RE2 share (no
look-around, no back-references); CEL's `matches` searches, so the CEL twin anchors them.

Pure: imports pydantic only (the operator imports it through wrpo.pipeline.spec).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema


@dataclass(frozen=True)
class Check:
    """A constraint with its CEL twin: `test(value)` in Python, `rule` over `self` on the apiserver."""

    test: Callable[[Any], bool]
    rule: str
    message: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def check(value: Any) -> Any:
            if value is not None and not self.test(value):
                raise PydanticCustomError("check", self.message)
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        out = handler(schema)
        out.setdefault("x-kubernetes-validations", []).append({"rule": self.rule, "message": self.message})
        return out


def full(regex: str) -> Callable[[str], bool]:
    """Python's side of `self.matches('^(?:regex)$')`."""
    compiled = re.compile(regex)
    return lambda v: compiled.fullmatch(v) is not None


def cel_matches(regex: str, expr: str = "self") -> str:
    """CEL: `expr` matches `regex` as a whole (a raw string literal: no escaping twice)."""
    assert "'" not in regex, regex
    return f"{expr}.matches(r'^(?:{regex})$')"


def regex_check(regex: str, message: str) -> Check:
    return Check(full(regex), cel_matches(regex), message)


def keys_check(regex: str, message: str, extra: tuple[Callable[[str], bool], str] | None = None) -> Check:
    """Every key of a map matches `regex` (and `extra`: a Python test and its CEL over `k`)."""
    ok = full(regex)
    test = (lambda k: ok(k) and extra[0](k)) if extra else ok
    rule = cel_matches(regex, "k") + (f" && {extra[1]}" if extra else "")
    return Check(lambda d: all(test(k) for k in d), f"self.all(k, {rule})", message)


def values_check(regex: str, message: str) -> Check:
    ok = full(regex)
    return Check(lambda d: all(ok(v) for v in d.values()), f"self.all(k, {cel_matches(regex, 'self[k]')})",
                 message)


# ---------------------------------------------------------------------------------------------- Kubernetes names

DNS_LABEL_RE = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN_RE = rf"{DNS_LABEL_RE}(\.{DNS_LABEL_RE})*"
ENV_NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"
# label and annotation keys: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters
QUALIFIED_NAME_RE = rf"({DNS_SUBDOMAIN_RE}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?"
LABEL_VALUE_RE = r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?"
QUANTITY_RE = r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?"

SECRET_KEY_RE = r"[-._a-zA-Z0-9]+"
# An image reference as the kubelet parses it (distribution/reference's grammar, which is regular):
# [domain[:port]/]path-component(/path-component)*[:tag][@digest], path components in lowercase.
_IMAGE_PATH = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
_IMAGE_HOST_PART = r"([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9])"
_IMAGE_DOMAIN = rf"{_IMAGE_HOST_PART}(\.{_IMAGE_HOST_PART})*"
IMAGE_RE = (rf"(({_IMAGE_DOMAIN}|\[[a-fA-F0-9:]+\])(:[0-9]+)?/)?{_IMAGE_PATH}(/{_IMAGE_PATH})*"
            r"(:[\w][\w.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")

DNS_LABEL_MSG = "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"
DNS_SUBDOMAIN_MSG = ("must be a DNS subdomain name (a Kubernetes object name): lowercase letters, digits, '-' "
                     "and '.', starting and ending with a letter or digit")
ENV_NAME_MSG = "must be an environment variable name: letters, digits and '_', not starting with a digit"
QUANTITY_MSG = "must be a positive Kubernetes quantity, e.g. 2, 500m, 8Gi"
SECRET_KEY_MSG = ("must be a Secret key: at most 253 letters, digits, '-', '_' or '.', not '.' or '..' and not "
                  "starting with '..'")
LABEL_KEY_MSG = ("must be a label key: [prefix/]name, the name at most 63 letters, digits, '-', '_' or '.', the prefix "
                 "a DNS subdomain of at most 253 characters")
IMAGE_MSG = ("must be an image reference: [registry[:port]/]name[:tag][@digest], the name in lowercase "
             "(e.g. registry.example.com/team/vllm:0.32)")


def _prefix_fits(key: str) -> bool:
    return key.find("/") <= 253


def _positive_quantity(value: str) -> bool:
    if not full(QUANTITY_RE)(value):
        return False
    number = re.match(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)", value)
    try:
        return number is not None and Decimal(number.group(0)) > 0
    except InvalidOperation:
        return False


DnsLabel = Annotated[str, regex_check(DNS_LABEL_RE, DNS_LABEL_MSG)]  # give it max_length=63 (or less) at the field
DnsSubdomain = Annotated[str, Field(max_length=253), regex_check(DNS_SUBDOMAIN_RE, DNS_SUBDOMAIN_MSG)]
EnvName = Annotated[str, Field(max_length=256), regex_check(ENV_NAME_RE, ENV_NAME_MSG)]
#: A ConfigMap or Secret key (Kubernetes' IsConfigMapKey): the key names a file when the Secret is mounted.
SecretKey = Annotated[str, Field(max_length=253), Check(
    lambda v: full(SECRET_KEY_RE)(v) and v != "." and not v.startswith(".."),
    f"{cel_matches(SECRET_KEY_RE)} && self != '.' && !self.startsWith('..')", SECRET_KEY_MSG)]
LabelKey = Annotated[str, Field(max_length=317), Check(
    lambda v: full(QUALIFIED_NAME_RE)(v) and _prefix_fits(v),
    f"{cel_matches(QUALIFIED_NAME_RE)} && self.indexOf('/') <= 253", LABEL_KEY_MSG)]
LabelValue = Annotated[str, Field(max_length=63), regex_check(LABEL_VALUE_RE, "must be a label value: at most 63 "
                                                              "letters, digits, '-', '_' or '.', starting and ending "
                                                              "with a letter or digit")]
#: What the kubelet can pull: a pod with another image fails with InvalidImageName once it is created.
ImageRef = Annotated[str, Field(min_length=1, max_length=512), regex_check(IMAGE_RE, IMAGE_MSG)]
Quantity = Annotated[str, Field(max_length=64), Check(
    _positive_quantity, "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))", QUANTITY_MSG)]

EnvMap = Annotated[dict[str, str], keys_check(
    ENV_NAME_RE, "keys must be environment variable names: letters, digits and '_', not starting with a digit")]
AnnotationMap = Annotated[dict[str, str], keys_check(
    QUALIFIED_NAME_RE, "keys must be annotation keys: [prefix/]name, the name at most 63 letters, digits, "
    "'-', '_' or '.', the prefix a DNS subdomain of at most 253 characters",
    (_prefix_fits, "k.indexOf('/') <= 253"))]
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=63)]], keys_check(
    QUALIFIED_NAME_RE, "keys must be label keys: [prefix/]name, the name at most 63 letters, digits, "
    "'-', '_' or '.', the prefix a DNS subdomain of at most 253 characters",
    (_prefix_fits, "k.indexOf('/') <= 253")),
    values_check(LABEL_VALUE_RE, "values must be label values: at most 63 letters, digits, '-', '_' or '.', "
                 "starting and ending with a letter or digit")]

# ---------------------------------------------------------------------------------------------- URIs and URLs

CREDENTIALS_RE = r"[A-Za-z][A-Za-z0-9+.-]*://[^/]*@.*"
CREDENTIALS_MSG = ("must not contain credentials (user:password@); give them as a Secret or an environment "
                   "variable (apiKeyEnv, apiKeySecret, storage.credentialsSecret)")
S3_URI_RE = r"s3://[^/]+(/.*)?"  # an s3:// URI with a bucket (the bucket's rules are S3_BUCKET_MSG's)
# S3's bucket naming rules (docs/spec.md, "Validation"), as two regular expressions over the URI
S3_BUCKET_URI_RE = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
S3_BAD_BUCKET_RE = r"s3://([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+|[^/]*\.\.[^/]*|xn--[^/]*|sthree-[^/]*|[^/]*-s3alias|[^/]*--ol-s3)(/.*)?"
S3_BUCKET_MSG = ("an s3:// bucket name must be 3 to 63 lowercase letters, digits, '.' or '-', start and end with a "
                 "letter or digit, not be an IP address, not contain '..', not start with 'xn--' or 'sthree-', not end "
                 "with '-s3alias' or '--ol-s3'")
HOST_RE = r"([A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
PORT_RE = r"(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
HTTP_URL_RE = rf"https?://{HOST_RE}{PORT_RE}(/[^?#\s]*)?"
LOOPBACK_URL_RE = r"https?://(localhost|127\.[0-9]+\.[0-9]+\.[0-9]+|\[::1\])([:/].*)?"

has_credentials = full(CREDENTIALS_RE)
is_loopback_url = full(LOOPBACK_URL_RE)
_s3_uri = full(S3_URI_RE)
_http_url = full(HTTP_URL_RE)

_NO_CREDENTIALS = Check(lambda v: not has_credentials(v), f"!{cel_matches(CREDENTIALS_RE)}", CREDENTIALS_MSG)


_s3_bucket_ok = full(S3_BUCKET_URI_RE)
_s3_bad_bucket = full(S3_BAD_BUCKET_RE)
_S3_BUCKET = Check(lambda v: has_credentials(v) or not _s3_uri(v) or (_s3_bucket_ok(v) and not _s3_bad_bucket(v)),
                   f"{cel_matches(CREDENTIALS_RE)} || !{cel_matches(S3_URI_RE)} || ({cel_matches(S3_BUCKET_URI_RE)} "
                   f"&& !{cel_matches(S3_BAD_BUCKET_RE)})", S3_BUCKET_MSG)


def _location(message: str, s3: bool = True) -> Any:
    """The one checked type of every URI or path field (docs/spec.md, "Validation"): at most 1024 characters,
    never credentials, `scheme://` only as s3://bucket/... (with `s3`) and that bucket named as S3 allows.
    A URI with credentials is left to _NO_CREDENTIALS (one message per mistake)."""
    if not s3:
        return Annotated[str, Field(min_length=1, max_length=1024), _NO_CREDENTIALS, Check(
            lambda v: has_credentials(v) or "://" not in v,
            f"{cel_matches(CREDENTIALS_RE)} || !self.contains('://')", message)]
    return Annotated[str, Field(min_length=1, max_length=1024), _NO_CREDENTIALS, Check(
        lambda v: has_credentials(v) or "://" not in v or _s3_uri(v),
        f"{cel_matches(CREDENTIALS_RE)} || !self.contains('://') || {cel_matches(S3_URI_RE)}", message), _S3_BUCKET]


StorageUri = _location("must be a local path or s3://bucket/prefix (no other scheme)")
ModelUri = _location("must be a local folder, a hub id (org/name) or s3://bucket/prefix (no other scheme)")
LocalFile = _location("must be a local file path (no scheme)", s3=False)
HttpUrl = Annotated[str, Field(max_length=512), _NO_CREDENTIALS, Check(
    lambda v: has_credentials(v) or _http_url(v),
    f"{cel_matches(CREDENTIALS_RE)} || {cel_matches(HTTP_URL_RE)}",
    "must be http(s)://host[:port][/path], without query or fragment")]


# ---------------------------------------------------------------------------------------------- vLLM arguments

#: Flags of `vllm serve` that the operator and `wrpo run` set from the spec (wrpo_operator.builders.vllm_args):
#: a user's copy would move the server off its Service's port, rename its model or change its GPUs or seed.
#: (`--gpu-memory-utilization` and `--max-model-len` stay open: the target has no field for them, and a later
#: flag wins.) vLLM reads `_` in a flag as `-`. Compared as strings (`--flag` or `--flag=value`): a regular expression
#: over every argument of every source costs the apiserver more than a CRD rule may.
_OPERATOR_FLAGS = ("model", "served-model-name", "host", "port", "tensor-parallel-size", "seed")
OPERATOR_VLLM_FLAGS = ("-tp", *dict.fromkeys(f"--{spelling}" for flag in _OPERATOR_FLAGS
                                             for spelling in (flag, flag.replace("-", "_"))))
VLLM_ARGS_MSG = ("must not set what the operator sets (the model, --served-model-name, --host, --port, "
                 "--tensor-parallel-size, --seed): use the spec's fields")


def _operator_flag(arg: str) -> bool:
    return any(arg == f or arg.startswith(f + "=") for f in OPERATOR_VLLM_FLAGS)


_FLAG_LIST = "[" + ", ".join(f"'{f}'" for f in OPERATOR_VLLM_FLAGS) + "]"
VllmArgs = Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=64), Check(
    lambda v: not any(_operator_flag(a) for a in v),
    f"!self.exists(a, {_FLAG_LIST}.exists(f, a == f || a.startsWith(f + '=')))", VLLM_ARGS_MSG)]


def is_s3_uri(value: str) -> bool:
    return _s3_uri(value)


def redact_url(url: str) -> str:
    """`scheme://user:pass@host/...` -> `scheme://***@host/...`, and no query string (for log lines)."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", url)
    return url.split("?", 1)[0].split("#", 1)[0]
