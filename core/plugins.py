"""Finding backend plugins, asking each whether it can run here, and activating exactly one.

Built-in and third-party backends are found the same way: the entry-point group `tgserve.backends`.
A plugin that fails to import is listed as unusable with its error; it only stops the server when it
is the backend the user asked for.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import pluggy

from tgserve.core import default_plugin, hookspecs
from tgserve.core.backend_status import BackendStatus

ENTRY_POINT_GROUP = "tgserve.backends"
# Hooks with no core default: the selected backend itself must answer them.
REQUIRED_HOOKS = ("tgserve_get_backend_status", "tgserve_get_device", "tgserve_get_default_dtype",
                  "tgserve_get_free_memory_bytes", "tgserve_synchronize")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing and how to get it."""


@dataclass(slots=True)
class ActiveBackend:
    """The one selected backend; `hook` calls only it plus the core defaults."""

    status: BackendStatus
    hook: "_ActiveHooks"

    @property
    def name(self) -> str:
        return self.status.name


class _ActiveHooks:
    """A view of the plugin manager's hooks that leaves out every backend but the selected one."""

    def __init__(self, pm: pluggy.PluginManager, others: list[object]):
        self._pm = pm
        self._others = others

    def __getattr__(self, name: str):
        return self._pm.subset_hook_caller(name, remove_plugins=self._others)


class BackendRegistry:
    """All backend plugins found in this environment, loaded or failed."""

    def __init__(self, extra_plugins: dict[str, object] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(default_plugin, name="tgserve-core-defaults")
        self.plugins: dict[str, object] = {}  # backend name -> plugin object
        self.failures: dict[str, str] = {}  # backend name -> import error, one line
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in self.plugins:
                continue  # the same distribution seen twice on sys.path
            try:
                self._register(entry_point.name, entry_point.load())
            except Exception as error:  # a broken third-party plugin must not take the server down
                self.failures[entry_point.name] = f"failed to load {entry_point.value}: {error!r}"
        for name, plugin in (extra_plugins or {}).items():
            self._register(name, plugin)

    def _register(self, name: str, plugin: object) -> None:
        """Register one backend; a hook name without a spec (a typo) rejects that plugin alone."""
        self.pm.register(plugin, name=f"backend:{name}")
        unknown = [caller.name for caller in self.pm.get_hookcallers(plugin) or () if not caller.has_spec()]
        if unknown:
            self.pm.unregister(plugin)
            raise pluggy.PluginValidationError(plugin, f"unknown hook(s) {', '.join(unknown)}")
        self.plugins[name] = plugin

    def statuses(self) -> list[BackendStatus]:
        """Every backend's answer, best first; failed imports appear as unusable."""
        found = []
        for name, plugin in self.plugins.items():
            found.append(self._status_of(name, plugin))
        for name, failure in self.failures.items():
            found.append(BackendStatus(name=name, is_usable=False, reason=failure))
        return sorted(found, key=lambda s: (not s.is_usable, -s.priority, s.name))

    def _status_of(self, name: str, plugin: object) -> BackendStatus:
        others = [p for n, p in self.plugins.items() if n != name]
        try:
            status = self.pm.subset_hook_caller("tgserve_get_backend_status", others)()
        except Exception as error:
            return BackendStatus(name=name, is_usable=False, reason=f"status check raised {error!r}")
        missing = [hook for hook in REQUIRED_HOOKS if not hasattr(plugin, hook)]
        if len(status) != 1 or missing:
            return BackendStatus(name=name, is_usable=False,
                                 reason=f"plugin does not implement {', '.join(missing) or 'its status hook'}")
        if status[0].name != name:
            return BackendStatus(name=name, is_usable=False,
                                 reason=f"plugin says its name is '{status[0].name}', its entry point says '{name}'")
        return status[0]

    def select(self, requested: str = "auto") -> ActiveBackend:
        """The backend named `requested`, or the best usable one for "auto"; raise if it cannot run."""
        if requested == "auto":
            usable = [s for s in self.statuses() if s.is_usable]
            if not usable:
                raise BackendUnavailable("no usable backend found; run `tgserve backends` to see why")
            status = usable[0]
        else:
            status = self._requested_status(requested)
        others = [p for n, p in self.plugins.items() if n != status.name]
        return ActiveBackend(status=status, hook=_ActiveHooks(self.pm, others))

    def _requested_status(self, requested: str) -> BackendStatus:
        if requested in self.failures:
            raise BackendUnavailable(f"backend '{requested}' {self.failures[requested]}")
        if requested not in self.plugins:
            known = ", ".join(sorted([*self.plugins, *self.failures])) or "none"
            raise BackendUnavailable(f"unknown backend '{requested}' (installed: {known})")
        status = self._status_of(requested, self.plugins[requested])
        if not status.is_usable:
            hint = f"; {status.install_hint}" if status.install_hint else ""
            raise BackendUnavailable(f"backend '{requested}' is not usable here: {status.reason}{hint}")
        return status
