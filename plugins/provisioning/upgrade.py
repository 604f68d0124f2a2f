"""Safe firmware paths for SIP phones, from the seeds' upgrade matrix and field notes.

The rules, each from where it is written:
- Signed images (5.x and later) cannot go back below 5.x: "Once a Version 5.0 firmware image is installed
  ... it cannot be replaced with any previous version" (seed 002 line 85; Table 3 footnote 1, line 234).
- SIP 5.x or 6.x to 7.x or later only through 6.3: "Upgrading from SIP 5.x directly to SIP 7.x is not
  possible. First upgrade to SIP 6.3" (seed 002 line 236); from 4.x and earlier to 7.x, Procedure F: 6.3
  first (seed 002 lines 218 and 295).
- Early images go in small steps: P0S30203 -> 4.4 -> 5.1 -> 6.3 -> 7.5 -> 8.x (seed 004 line 45); images
  before P0S30203 fetch only 8.3 file names (seed 004 lines 78-83); upgrade to 4.4 first, then into the signed
  5.x (seed 004 line 95); 5.1 straight to 8.2 failed where 6.3 -> 7.5 -> 8.2 worked (seed 004 line 99).
- 7.x or later to 7.x or later: Procedure E, direct, also downward (seed 002 line 223; seed 004 line 111:
  image_version up or down, "the phones would up- or down- grade as necessary"). 7.x to 6.x or earlier is
  not in the matrix: refused.

`plan(current, target)` gives the steps (each an image a phone must reach, in order) or a `Refusal`;
`required_files(image)` the files that step needs in the TFTP root.
"""

import re

import attrs

EIGHT_THREE_LAST = "P0S30203"  # the last 8.3-named SIP image, and the first step out of them (seed 004 line 78)
WAYPOINTS = ("P0S3-04-4-00", "P0S3-05-1-00", "P0S3-06-3-00", "P0S3-07-5-00")


class PlanError(ValueError):
    """The image name cannot be read."""


@attrs.frozen
class Refusal:
    reason: str


def version(image: str) -> tuple[int, int, int]:
    """(major, minor, sub) of a SIP image: P0S3-08-12-00 -> (8, 12, 0); P0S30203 -> (2, 0, 3)."""
    m = re.fullmatch(r"P0S3-(\d{2})-(\d{1,2})-(\d{2})[A-Za-z0-9]*", image, re.I)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = re.fullmatch(r"P0S3(\d{2})(\d{2})", image, re.I)
    if m:  # 8.3 names: xx = major, yy = minor (seed 002 line 58)
        return int(m.group(1)), int(m.group(2)), 0
    if re.match(r"P00|P0M", image, re.I):
        raise PlanError(f"{image} is an SCCP or MGCP image: the upgrade planner moves SIP phones between SIP images")
    raise PlanError(f"{image!r} is not a SIP image name (P0S3-xx-y-zz, or P0S3xxyy for the earliest)")


def image_for(firmware: str) -> str:
    """The image a registered phone reports in User-Agent: "7.5" -> P0S3-07-5-00; an image name stays."""
    if firmware.upper().startswith("P0S3"):
        return firmware.upper()
    parts = [p for p in re.split(r"[.\-()]", firmware) if p.isdigit()]
    if len(parts) < 2:
        raise PlanError(f"cannot tell the image from firmware {firmware!r}")
    return f"P0S3-{int(parts[0]):02d}-{int(parts[1])}-{int(parts[2]) if len(parts) > 2 else 0:02d}"


def plan(current: str, target: str) -> list[str] | Refusal:
    try:
        now, goal = version(current), version(target)
    except PlanError as e:
        return Refusal(str(e))
    if now == goal:
        return []
    if goal < (5, 0, 0) <= now:
        return Refusal(f"{current} is a signed image: a phone on 5.x or later cannot go back to {target} "
                       "(seed 002: image authentication allows no downgrade below 5.x)")
    if now >= (7, 0, 0) > goal:
        return Refusal(f"{current} runs the universal application loader: going back to {target} is not in the "
                       "upgrade matrix (seed 002 Table 3); choose a 7.x or later image")
    if goal < now:
        return [target]  # down, within 5.x-6.x or below 5.x
    steps = []
    if now < version(EIGHT_THREE_LAST) and goal > version(EIGHT_THREE_LAST):
        steps.append(EIGHT_THREE_LAST)  # the older ones fetch only 8.3 file names
    four_four, five_one, six_three, seven_five = (version(w) for w in WAYPOINTS)
    if now < four_four and goal >= (5, 0, 0):
        steps.append(WAYPOINTS[0])  # 4.4 first, then into the signed images
    if now < (5, 0, 0) and goal >= (6, 0, 0):
        steps.append(WAYPOINTS[1])
    if now < six_three and goal >= (7, 0, 0):
        steps.append(WAYPOINTS[2])  # the only way into 7.x
    if now < (7, 0, 0) and goal >= (8, 0, 0):
        steps.append(WAYPOINTS[3])  # 6.3 -> 7.5 -> 8.x, as seed 004 found it works
    steps = [s for s in dict.fromkeys(steps) if now < version(s) < goal]
    return steps + [target]


def required_files(image: str) -> list[str]:
    """What the TFTP root must hold for a phone to take this image (seed 002 lines 81 and 114, seed 001 line 990)."""
    major = version(image)[0]
    if major >= 7:
        return [f"{image}.loads", f"{image}.sb2"]  # the loads file names the loader (P003...sbn) it brings
    if major >= 5:
        return [f"{image}.sbn"]  # signed
    return [f"{image}.bin"]
