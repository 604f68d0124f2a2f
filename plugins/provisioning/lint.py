"""`sipproxy-admin tftp lint`: what in a TFTP root would leave a phone unconfigured, looping, or bricked.

Each finding names the file, the line (0: the whole file) and what to do:
- SIPDefault.cnf, SIP<MAC>.cnf: syntax (seed 001 line 1025), unknown parameter names and values out of
  range (Table 3-3), line parameters in SIPDefault.cnf, lines left UNPROVISIONED (seed 001 line 1112), timer_t2
  not above timer_t1;
- an image named in image_version, OS79XX.TXT or a loadInformation element whose files are not there
  (seed 002: "Protocol Application Invalid");
- an image named for the phones whose files are not 8.3 names while images older than P0S30203 are in the
  root (phones on those fetch only 8.3 names, seed 004 line 83);
- an empty SEP<MAC>.cnf.xml (seed 003: the trap that ends in "Protocol Application Invalid").
"""

import os
import re

import attrs

from plugins.provisioning.cnf import PARAMETERS, PHONE_ONLY, check_value, parse
from plugins.provisioning.upgrade import EIGHT_THREE_LAST, PlanError, required_files, version

_LOAD_INFO = re.compile(r"<loadInformation\d+[^>]*>\s*([^<\s]+)\s*</loadInformation\d+>", re.I)
_MAC_CNF = re.compile(r"SIP[0-9A-F]{12}\.cnf\Z")


@attrs.frozen
class Finding:
    file: str
    line: int
    severity: str  # error, warning
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.severity}: {self.message}" if self.line else \
            f"{self.file}: {self.severity}: {self.message}"

    def as_json(self) -> dict:
        return attrs.asdict(self)


def _is_8_3(name: str) -> bool:
    stem, _, ext = name.partition(".")
    return 0 < len(stem) <= 8 and len(ext) <= 3 and "." not in ext


def lint(root: str) -> list[Finding]:
    if not os.path.isdir(root):
        return [Finding(root, 0, "error", "no such directory: set [plugins.provisioning] tftp_root")]
    names = sorted(os.listdir(root))
    present = {n.lower() for n in names}
    findings: list[Finding] = []
    images: dict[str, tuple[str, int]] = {}  # image -> where it is named first

    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        if name == "SIPDefault.cnf" or _MAC_CNF.match(name):
            findings += _lint_cnf(root, name, images)
        elif re.fullmatch(r"SIP[0-9a-fA-F]{12}\.cnf", name, re.I) or name.lower() == "sipdefault.cnf":
            findings.append(Finding(name, 0, "error", "the phones ask for SIPDefault.cnf and SIP<MAC>.cnf with the "
                                    "MAC in upper case and .cnf in lower case (seed 001 line 1032): rename it"))
        elif re.fullmatch(r"SEP[0-9A-Fa-f]{12}\.cnf\.xml", name):
            text = _read(path)
            if not text.strip():
                findings.append(Finding(name, 0, "error", "empty: a phone on the universal loader loops on it and "
                                        "ends in 'Protocol Application Invalid' (seed 003); give it the loadInformation "
                                        "XML for its model, or remove it"))
            _images_in_xml(name, text, images)
        elif name.lower() == "xmldefault.cnf.xml":
            _images_in_xml(name, _read(path), images)
        elif name.upper() == "OS79XX.TXT":
            text = _read(path).strip()
            if not text:
                findings.append(Finding(name, 0, "error", "empty: it must name the image to boot (seed 001 line 984)"))
            else:
                images.setdefault(text.split()[0], (name, 1))

    old_images = [n for n in names if re.fullmatch(r"P0S3\d{4}\.bin", n, re.I) and version(n[:8]) < version(EIGHT_THREE_LAST)]
    for image, (where, line) in images.items():
        try:
            needed = required_files(image) if not image.upper().startswith("P003") else [f"{image}.sbn"]
            era = version(image) if not image.upper().startswith("P003") else None
        except PlanError:
            continue
        missing = [f for f in needed if f.lower() not in present]
        if image.upper().startswith("P003") and f"{image}.bin".lower() in present:
            missing = []
        if missing:
            findings.append(Finding(where, line, "error", f"{image} is named here but {', '.join(missing)} "
                                    f"{'is' if len(missing) == 1 else 'are'} not in the TFTP root: unzip the whole image package there (seed 002 "
                                    "Procedure D), or a phone ends in 'Protocol Application Invalid'"))
        if old_images and era is not None and any(not _is_8_3(f) for f in needed) and where in ("OS79XX.TXT",
                                                                                                "SIPDefault.cnf"):
            findings.append(Finding(where, line, "warning", f"{old_images[0]} is here, so phones may still run an "
                                    f"image before {EIGHT_THREE_LAST}: they fetch only 8.3 file names and cannot get "
                                    f"{', '.join(f for f in needed if not _is_8_3(f))} (seed 004 line 83); take them "
                                    f"to {EIGHT_THREE_LAST} first (sipproxy-admin upgrade plan)"))
    return findings


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("latin-1")


def _images_in_xml(name: str, text: str, images: dict) -> None:
    for match in _LOAD_INFO.finditer(text):
        images.setdefault(match.group(1), (name, text[:match.start()].count("\n") + 1))


def _lint_cnf(root: str, name: str, images: dict) -> list[Finding]:
    entries, problems = parse(_read(os.path.join(root, name)))
    findings = [Finding(name, p.line, "error", p.message) for p in problems]
    default = name == "SIPDefault.cnf"
    values: dict[str, tuple[str, int]] = {}
    for entry in entries:
        if entry.name in values:
            findings.append(Finding(name, entry.line, "warning", f"{entry.raw_name} is set again (line "
                                    f"{values[entry.name][1]} is overridden)"))
        values[entry.name] = (entry.value, entry.line)
        if entry.name not in PARAMETERS:
            findings.append(Finding(name, entry.line, "warning", f"{entry.raw_name} is not a parameter of the SIP "
                                    "firmware's configuration (seed 001 Table 3-2): a typo, or newer firmware's"))
            continue
        problem = check_value(entry.name, entry.value)
        if problem:
            findings.append(Finding(name, entry.line, "error", f"{entry.raw_name} {entry.value!r}: {problem}"))
        if default and entry.name in PHONE_ONLY:
            findings.append(Finding(name, entry.line, "warning", f"{entry.raw_name} belongs in each phone's "
                                    "SIP<MAC>.cnf, not in SIPDefault.cnf, which every phone reads (seed 001 line 1058)"))
        if entry.name == "image_version" and entry.value and not problem:
            images.setdefault(entry.value, (name, entry.line))
    for n in range(1, 7):
        line_name = values.get(f"line{n}_name", ("", 0))[0]
        if not line_name or line_name == "UNPROVISIONED":
            continue
        for key in (f"line{n}_authname", f"line{n}_password"):
            value, at = values.get(key, ("", values[f"line{n}_name"][1]))
            if value in ("", "UNPROVISIONED") and not (n > 1 and values.get(f"line1_{key.split('_', 1)[1]}")):
                findings.append(Finding(name, at, "error", f"line {n} ({line_name}) has no {key}: the phone "
                                        "authenticates as UNPROVISIONED and every REGISTER is refused (seed 001 "
                                        "line 1112); sipproxy-admin phone add sets it"))
    t1, t2 = values.get("timer_t1", ("", 0)), values.get("timer_t2", ("", 0))
    if t1[0].isdigit() and t2[0].isdigit() and int(t2[0]) <= int(t1[0]):
        findings.append(Finding(name, t2[1], "error", "timer_t2 must be greater than timer_t1 (seed 001 Table 3-3)"))
    return findings
