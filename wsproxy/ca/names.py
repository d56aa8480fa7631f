"""What the CA accepts as a name to write into a certificate (subject CN, DNS SAN, file name).

A name ends up in HTTP headers (``X-Client-Cert-Subject``), JSON logs and operators' terminals,
so characters that end a line or steer a terminal are refused wherever a name is taken: the C0
controls, DEL and the C1 controls (Unicode category Cc), the line and paragraph separators
U+2028/U+2029 (``str.splitlines`` and JavaScript break on them) and the bidirectional controls
(text that displays differently from what it is, CVE-2021-42574). Letters of any script stay
allowed: a CN is written as a UTF8String (RFC 5280 §4.1.2.6).
"""

from __future__ import annotations

import re
import unicodedata

from wsproxy.errors import CAInputError

# RFC 5280 Appendix A: ub-common-name 64.
COMMON_NAME_MAX = 64
# Bidi embeddings, overrides and isolates, and the marks (Unicode's Bidi_Control property).
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
LINE_SEPARATORS = frozenset("\u2028\u2029")
# A DNS SAN: LDH labels (underscore too, as service names use it), an optional leading "*."
# (RFC 6125 §6.4.3), at most 253 octets (RFC 1035 §2.3.4).
DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def check_printable(value: str, what: str) -> str:
    """``value`` unchanged, or ``CAInputError`` naming ``what`` (the option) and the first
    character refused, by code point and position."""
    for position, char in enumerate(value):
        if "\udc80" <= char <= "\udcff":
            # Python's stand-in for a byte that is not UTF-8 in a command-line argument.
            raise CAInputError(
                f"{what} {value!r}: not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at position "
                f"{position}); give the name in UTF-8"
            )
        category = unicodedata.category(char)
        if category in ("Cc", "Cs") or char in LINE_SEPARATORS or char in BIDI_CONTROLS:
            kind = "a bidirectional control" if char in BIDI_CONTROLS else "a control character"
            raise CAInputError(
                f"{what} {value!r}: contains {kind} (U+{ord(char):04X} at position {position}); "
                "names in certificates must be printable, since they reach HTTP headers and logs"
            )
    return value


def check_common_name(value: str, what: str) -> str:
    """A subject CN: printable, 1-64 characters."""
    check_printable(value, what)
    if not 1 <= len(value) <= COMMON_NAME_MAX:
        raise CAInputError(
            f"{what} {value!r}: a common name has 1 to at most {COMMON_NAME_MAX} characters "
            f"(RFC 5280's ub-common-name), got {len(value)}"
        )
    return value


def check_dns_name(value: str, what: str = "--dns") -> str:
    """A DNS SAN in ASCII (A-labels), optionally a leading ``*.`` wildcard."""
    check_printable(value, what)
    if not value.isascii():
        try:
            a_label = value.encode("idna").decode("ascii")
            hint = f": use its A-label form, {a_label}"
        except UnicodeError:
            hint = ""
        raise CAInputError(
            f"{what} {value!r}: a DNS name in a certificate must be ASCII, with international "
            f"names in their A-label (xn--) form (RFC 5280 §4.2.1.6){hint}"
        )
    labels = value.removeprefix("*.").split(".")
    if len(value) > 253 or not all(DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise CAInputError(
            f"{what} {value!r}: not a DNS name (dot-separated labels of 1-63 letters, digits, "
            "'-' or '_', not starting or ending with '-'; at most 253 characters; a wildcard "
            "only as a leading '*.')"
        )
    return value
