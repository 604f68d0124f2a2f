"""`sipproxy-admin upgrade run`: phones taken along their safe paths, a few at a time, to the end or to a stop.

For each phone, each step of its path (plugins/provisioning/upgrade.py) is:
1. its own SIP<MAC>.cnf gets `image_version` = the step's image (never SIPDefault.cnf: a phone outside the
   wave that reboots meanwhile must not move, seed 004 line 111);
2. a check-sync reboot (proxy/admin/checksync.py, with wait): the phone reboots, reads its configuration,
   fetches the image, reboots into it and registers again;
3. when it registers on the step's image, the next step begins; when it does not come back within
   `timeout`, comes back on another image, or refuses the NOTIFY, its path stops there and says why:
   the other phones go on.

At most `parallel` phones are rebooting at once. The run is kept in `<state_dir>/upgrade.json` after every
change, so a restart of the server resumes it: a phone that was rebooting is looked at again (on the step's
image by now: next step; else the step is done again).
"""

import json
import os
import tempfile

import attrs
from twisted.logger import Logger

from plugins.provisioning.upgrade import PlanError, Refusal, image_for, plan, required_files, version

log = Logger()

RUN_FILE = "upgrade.json"


@attrs.define
class PhonePath:
    device: str  # SEP<MAC>
    lines: list
    steps: list  # images, in order
    step: int = 0
    state: str = "waiting"  # waiting, rebooting, done, failed
    detail: str = ""
    firmware: str = ""  # as last registered
    since: float = 0.0

    def as_json(self) -> dict:
        return attrs.asdict(self)


class Rollout:
    def __init__(self, clock, site, path: str, *, reboot, registered, target: str = "", parallel: int = 5,
                 timeout: float = 900.0, phones: list[PhonePath] | None = None, started: float | None = None,
                 cancelled: bool = False):
        self.clock = clock
        self.site = site  # plugins/provisioning/site.py Site
        self.path = path
        self.reboot = reboot  # reboot([registered phone], wait_timeout) -> RebootJob
        self.registered = registered  # () -> {user name: registered inventory Phone}
        self.target = target
        self.parallel = parallel
        self.timeout = timeout
        self.phones = phones or []
        self.started = clock.seconds() if started is None else started
        self.cancelled = cancelled
        self._jobs: dict[str, tuple[object, str]] = {}  # device -> (RebootJob, its device name there)

    # -- planning ---------------------------------------------------------------------

    @classmethod
    def plan_for(cls, provisioned, registered: dict, target: str) -> list[PhonePath]:
        out = []
        for phone in sorted(provisioned, key=lambda p: p.device):
            reg = next((registered[line] for line in phone.lines if line in registered), None)
            path = PhonePath(device=phone.device, lines=list(phone.lines), steps=[])
            if reg is None or not reg.firmware:
                path.state, path.detail = "failed", "not registered: its firmware is unknown (register it first)"
            else:
                path.firmware = reg.firmware
                try:
                    steps = plan(image_for(reg.firmware), target)
                except PlanError as e:
                    steps = Refusal(str(e))
                if isinstance(steps, Refusal):
                    path.state, path.detail = "failed", steps.reason
                elif not steps:
                    path.state, path.detail = "done", f"already on {target}"
                else:
                    path.steps = steps
            out.append(path)
        return out

    def missing_files(self) -> list[str]:
        present = {n.lower() for n in os.listdir(self.site.root)} if os.path.isdir(self.site.root) else set()
        needed = {f for p in self.phones if p.state != "failed" for s in p.steps for f in required_files(s)}
        return sorted(f for f in needed if f.lower() not in present)

    # -- running --------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return all(p.state in ("done", "failed") for p in self.phones) or (
            self.cancelled and not any(p.state == "rebooting" for p in self.phones))

    def tick(self) -> None:
        """Once a second: follow the reboots under way, start the next phones."""
        changed = False
        registered = None
        for p in self.phones:
            if p.state != "rebooting":
                continue
            if p.device not in self._jobs:  # resumed after a restart: where is it now?
                registered = registered or self.registered()
                changed |= self._resume(p, registered)
                continue
            job, name = self._jobs[p.device]
            result = job.results.get(name)
            if result is None:
                continue
            changed |= self._follow(p, result)
        if not self.cancelled:
            busy = sum(p.state == "rebooting" for p in self.phones)
            for p in self.phones:
                if busy >= self.parallel:
                    break
                if p.state == "waiting":
                    registered = registered or self.registered()
                    if self._start_step(p, registered):
                        busy += 1
                    changed = True
        if changed:
            self.save()

    def _start_step(self, p: PhonePath, registered: dict) -> bool:
        reg = next((registered[line] for line in p.lines if line in registered), None)
        if reg is None:
            self._fail(p, "no longer registered: cannot send it a check-sync NOTIFY")
            return False
        image = p.steps[p.step]
        try:
            self.site.set_image(p.device, image)
            job = self.reboot([reg], self.timeout)
        except Exception as e:  # a reboot job of the admin's own holds the phone: try again next second
            log.info("Upgrade: {device} not rebooted yet: {error}", device=p.device, error=e)
            return False
        self._jobs[p.device] = (job, reg.device)
        p.state, p.since = "rebooting", self.clock.seconds()
        p.detail = f"step {p.step + 1} of {len(p.steps)}: to {image}"
        log.info("Upgrade: {device} {detail}", device=p.device, detail=p.detail)
        return True

    def _follow(self, p: PhonePath, result) -> bool:
        image = p.steps[p.step]
        if result.state in ("refused", "no_answer", "not_registered"):
            return self._fail(p, f"the check-sync NOTIFY for {image}: {result.state.replace('_', ' ')}"
                                 + (f" ({result.status} {result.reason})" if result.status else ""))
        if result.outcome == "not_back":
            return self._fail(p, f"not back within {self.timeout:g} s of its reboot to {image}: look at "
                                 "sipproxy-admin tftp log --phone " + p.device)
        if result.outcome in ("rebooted", "same_firmware"):
            p.firmware = result.firmware_after
            return self._reached(p, image)
        return False

    def _reached(self, p: PhonePath, image: str) -> bool:
        self._jobs.pop(p.device, None)
        try:
            arrived = version(image_for(p.firmware)) == version(image)
        except PlanError:
            arrived = False
        if not arrived:
            return self._fail(p, f"came back on {p.firmware or 'unknown firmware'}, not {image}: the image files "
                                 "may be missing or refused (sipproxy-admin tftp log --phone " + p.device + ")")
        p.step += 1
        if p.step >= len(p.steps):
            p.state, p.detail = "done", f"on {image}"
        else:
            p.state, p.detail = "waiting", f"on {image}, next {p.steps[p.step]}"
        log.info("Upgrade: {device} {detail}", device=p.device, detail=p.detail)
        return True

    def _resume(self, p: PhonePath, registered: dict) -> bool:
        reg = next((registered[line] for line in p.lines if line in registered), None)
        if reg is not None and reg.firmware:
            p.firmware = reg.firmware
            try:
                if version(image_for(reg.firmware)) == version(p.steps[p.step]):
                    return self._reached(p, p.steps[p.step])
            except PlanError:
                pass
        p.state = "waiting"  # the step again
        return True

    def _fail(self, p: PhonePath, why: str) -> bool:
        self._jobs.pop(p.device, None)
        p.state, p.detail = "failed", why
        log.warn("Upgrade: {device} stopped: {why}", device=p.device, why=why)
        return True

    # -- keeping it -----------------------------------------------------------------

    def as_json(self) -> dict:
        counts: dict[str, int] = {}
        for p in self.phones:
            counts[p.state] = counts.get(p.state, 0) + 1
        return {"target": self.target, "parallel": self.parallel, "timeout": self.timeout, "started": self.started,
                "cancelled": self.cancelled, "done": self.done, "summary": counts,
                "phones": [p.as_json() for p in self.phones]}

    def save(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".upgrade-", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(self.as_json(), f, indent=1)
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, clock, site, path: str, *, reboot, registered) -> "Rollout | None":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        phones = [PhonePath(**p) for p in data["phones"]]
        return cls(clock, site, path, reboot=reboot, registered=registered, target=data["target"],
                   parallel=data["parallel"], timeout=data["timeout"], phones=phones, started=data["started"],
                   cancelled=data.get("cancelled", False))
