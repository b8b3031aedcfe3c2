"""Frame sources for the line-side station: a watched folder, a glob, a video file or stream, a GenICam camera.

    source = open_source("/camera/drop")                 # folder watch (watchdog, else polling)
    source = open_source("lines/*/cam0/*.png")           # finite glob
    source = open_source("run.avi") / open_source("rtsp://cam1/stream")   # OpenCV VideoCapture
    source = open_source("genicam://", cti="/opt/mvIMPACT/lib/x86_64/mvGenTLProducer.cti")
    for frame in source.frames(channels=1, stop=threading.Event()): ...

Every source yields :class:`Frame` objects: an arrival time, a wall-clock timestamp, an id (the
file path or the frame index) and either the decoded ``uint8`` (H, W, C) image, a ``loader``
that decodes it (files: decoded by the station's decode threads), or an ``error`` (a frame that
could not be used; the station records it and goes on).

A folder watch only hands over files that are complete: their size and modification time must be
unchanged across two looks at least ``settle`` seconds apart, or the writer renamed them into
place (seen as a move event when watchdog is installed). Temporary and hidden names (``*.tmp``,
``*.part``, ``.name``, ``~name``) and non-image files are ignored, so a camera that writes
``frame.png.tmp`` and renames it, or one that writes ``frame.png`` slowly, are both read whole.
"""

from __future__ import annotations

import datetime as _dt
import glob as _glob
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from lineside.vision.io import ImageReadError, _to_uint8, is_image_file, read_image

__all__ = [
    "Frame",
    "FrameError",
    "Source",
    "SourceError",
    "FolderSource",
    "GlobSource",
    "VideoSource",
    "GenICamSource",
    "VIDEO_EXTENSIONS",
    "STREAM_SCHEMES",
    "convert_frame",
    "convert_genicam",
    "find_cti_files",
    "is_ignored_name",
    "open_source",
    "utc_now_iso",
]

VIDEO_EXTENSIONS = (".avi", ".mp4", ".m4v", ".mkv", ".mov", ".mpg", ".mpeg", ".wmv", ".webm", ".ts", ".mjpg", ".mjpeg", ".h264", ".h265", ".hevc")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".swp", ".lock", "~")


class SourceError(RuntimeError):
    """A source cannot be opened (missing folder, no files, no camera, missing optional package)."""


class FrameError(ValueError):
    """A frame cannot be turned into the model's (H, W, C) uint8 input."""


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Frame:
    """One frame on its way through the station.

    Attributes:
        source: the source it came from (its spec, e.g. the folder or the URL).
        index: the frame index in the source (video / camera), or the running count of files.
        path: the file it was read from (None for video and cameras).
        arrival: ``time.perf_counter()`` when the frame arrived (file complete, frame grabbed);
            latency is counted from here.
        timestamp: ISO 8601 UTC wall-clock time of arrival.
        image: uint8 (H, W, C) at the model's channels, once decoded.
        loader: decodes the image (files; run by the station's decode threads).
        error: why the frame could not be used (then ``image`` is None).
        dropped: the station was behind a live source and let this frame go uninspected.
    """

    source: str
    index: int
    path: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    timestamp: str = field(default_factory=utc_now_iso)
    image: np.ndarray | None = None
    loader: Callable[[], np.ndarray] | None = None
    error: str | None = None
    dropped: bool = False

    def load(self) -> "Frame":
        """Run the loader (if any); a failure becomes ``error``."""
        if self.loader is not None and self.image is None and self.error is None:
            try:
                self.image = self.loader()
            except (ImageReadError, FrameError, OSError, ValueError) as exc:
                self.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the line
                self.error = f"{type(exc).__name__}: {exc}"
            self.loader = None
        return self


def convert_frame(frame: np.ndarray, channels: int, order: str = "RGB") -> np.ndarray:
    """A decoded frame (H, W) / (H, W, 1|3|4), any integer or float dtype → uint8 (H, W, ``channels``).

    ``order`` says how 3/4-channel frames are laid out: ``"BGR"`` for OpenCV, ``"RGB"`` otherwise.
    Colour goes to grey with OpenCV's luma weights; grey is replicated to 3 channels.

    Raises:
        FrameError: no pixels, or a layout that is not an image (2 channels, 5-D …).
    """
    import cv2

    if channels not in (1, 3):
        raise FrameError(f"channels must be 1 or 3, got {channels}")
    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise FrameError(f"frame of shape {a.shape} is not an image (expected H x W, H x W x 3 or H x W x 4)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise FrameError(f"frame has no pixels (shape {a.shape})")
    try:
        a = _to_uint8(a)
    except ValueError as exc:
        raise FrameError(str(exc)) from None
    bgr = order.upper() == "BGR"
    if a.ndim == 2:
        out = a if channels == 1 else cv2.cvtColor(a, cv2.COLOR_GRAY2RGB)
    elif a.shape[2] == 4:
        code = (cv2.COLOR_BGRA2GRAY if bgr else cv2.COLOR_RGBA2GRAY) if channels == 1 else (cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
        out = cv2.cvtColor(np.ascontiguousarray(a), code)
    elif channels == 1:
        out = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    else:
        out = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_BGR2RGB) if bgr else a
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out)


def is_ignored_name(name: str) -> bool:
    """Temporary, hidden or backup names a camera or copier writes before the final one."""
    low = name.lower()
    return name.startswith((".", "~")) or low.endswith(TEMP_SUFFIXES)


class Source:
    """Base class. ``frames(channels, stop)`` yields :class:`Frame` until the source ends or ``stop`` is set.

    Attributes:
        spec: what was asked for (folder, glob, URL).
        live: frames that are not taken in time are lost (stream, camera): when the station
            falls behind, new frames are dropped (and recorded as such) rather than waited for.
        reader: file sources: ``reader(path)`` decodes a file instead of ``read_image`` (a point
            model's station sets it to read and prepare clouds; the frame's ``image`` is then
            what it returns).
        extensions: file sources: the suffixes a folder watch hands over (None = image files).
    """

    live = False
    reader: Callable[[str], object] | None = None
    extensions: tuple[str, ...] | None = None

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def frames(self, channels: int, stop: threading.Event) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{type(self).__name__.replace('Source', '').lower()} {self.spec}"


# -------------------------------------------------------------------------------------------
# files


def _file_loader(path: str, channels: int, snapshot: tuple[int, int] | None, settle: float, retries: int = 3,
                 reader: Callable[[str], object] | None = None) -> Callable[[], np.ndarray]:
    """Decode ``path`` (with ``reader`` when given); if decoding fails while the file is still changing, wait until it settles and retry."""

    def load() -> np.ndarray:
        seen = snapshot
        for attempt in range(retries + 1):
            try:
                return reader(path) if reader is not None else read_image(path, channels)
            except ImageReadError:
                if attempt == retries:
                    raise
                try:
                    st = os.stat(path)
                except OSError:
                    raise ImageReadError(f"{path}: file vanished before it could be read") from None
                now = (st.st_size, st.st_mtime_ns)
                if seen is None or now == seen:
                    raise  # complete and still unreadable: a corrupt file
                seen = now  # it grew after it looked complete: a slow writer; wait and retry
                deadline = time.monotonic() + max(settle, 0.05) * 20
                while time.monotonic() < deadline:
                    time.sleep(max(settle, 0.05))
                    st = os.stat(path)
                    if (st.st_size, st.st_mtime_ns) == seen:
                        break
                    seen = (st.st_size, st.st_mtime_ns)
        raise ImageReadError(f"{path}: unreadable")  # pragma: no cover

    return load


class GlobSource(Source):
    """A finite, sorted list of files (a glob, or a single image file)."""

    def __init__(self, spec: str, paths: Sequence[str] | None = None) -> None:
        super().__init__(spec)
        self.paths = list(paths) if paths is not None else sorted(f for f in _glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not self.paths:
            raise SourceError(f"{spec}: no files match")

    def frames(self, channels: int, stop: threading.Event) -> Iterator[Frame]:
        for i, path in enumerate(self.paths):
            if stop.is_set():
                return
            yield Frame(self.spec, i, path, loader=_file_loader(path, channels, None, 0.0, retries=0, reader=self.reader))


class FolderSource(Source):
    """Watch a folder (recursively) for image files a camera writes; see the module docstring.

    Args:
        folder: the folder to watch.
        existing: ``"process"`` the image files already there at start, or ``"skip"`` them.
        once: stop when the folder is drained (every file present, or written meanwhile, handed
            over and nothing pending) instead of watching on.
        poll: seconds between looks at pending files (and between full scans when polling).
        settle: seconds a file's size and modification time must stay unchanged before it is read.
        use_watchdog: None = watchdog when installed, else polling; False = always poll.
        rescan: seconds between full scans while watchdog delivers events (catches files on
            network mounts, where no events come).
        done: paths already processed (e.g. read back from the results file); skipped at start.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        existing: str = "process",
        once: bool = False,
        poll: float = 0.1,
        settle: float = 0.25,
        use_watchdog: bool | None = None,
        rescan: float = 5.0,
        done: set[str] | None = None,
    ) -> None:
        super().__init__(os.fspath(folder))
        if existing not in ("process", "skip"):
            raise ValueError(f"existing must be 'process' or 'skip', got {existing!r}")
        self.root = Path(folder)
        if not self.root.is_dir():
            raise SourceError(f"{folder}: folder not found")
        self.existing = existing
        self.once = once
        self.poll = max(0.005, float(poll))
        self.settle = max(0.0, float(settle))
        self.rescan = rescan
        self.done = {os.path.abspath(p) for p in (done or ())}
        self._events: set[str] = set()
        self._moved: set[str] = set()
        self._lock = threading.Lock()
        self._observer = None
        self.watcher = "polling"
        if use_watchdog is not False and not once:  # --once scans until drained; no events needed
            try:
                import watchdog.observers  # noqa: F401

                self.watcher = "watchdog"
            except ImportError:
                if use_watchdog:
                    raise SourceError("watchdog is not installed (pip install watchdog); or watch by polling") from None

    def describe(self) -> str:
        return f"folder {self.spec} ({self.watcher}, existing files: {self.existing}{', once' if self.once else ''})"

    # -- looking -------------------------------------------------------------------------
    def _scan(self) -> dict[str, os.stat_result]:
        found: dict[str, os.stat_result] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if is_ignored_name(name) or not self._accepts(name):
                    continue
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                found[os.path.abspath(p)] = st
        return found

    def _accepts(self, name: str) -> bool:
        return is_image_file(name) if self.extensions is None else name.lower().endswith(self.extensions)

    def _wanted(self, path: str) -> bool:
        name = os.path.basename(path)
        if is_ignored_name(name) or not self._accepts(name):
            return False
        rel = os.path.relpath(path, self.root)
        return not any(part.startswith(".") for part in Path(rel).parts[:-1])

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        source = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # noqa: ANN001 - watchdog's event
                if event.is_directory:
                    return
                kind = event.event_type
                if kind == "moved":
                    path, moved = os.fsdecode(event.dest_path), True
                elif kind in ("created", "modified"):
                    path, moved = os.fsdecode(event.src_path), False
                else:
                    return
                path = os.path.abspath(path)
                if source._wanted(path):
                    with source._lock:
                        source._events.add(path)
                        if moved:  # renamed into place: complete (a "closed" event is not: writers may reopen)
                            source._moved.add(path)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.root), recursive=True)
        self._observer.daemon = True
        self._observer.start()

    # -- the loop ------------------------------------------------------------------------
    def frames(self, channels: int, stop: threading.Event) -> Iterator[Frame]:
        # path → mtime_ns it had when handed over; a file rewritten later (new mtime) is a new frame
        handed: dict[str, int] = {}
        # pending path → (size, mtime_ns, looks, since): a file seen but not yet complete
        pending: dict[str, tuple[int, int, int, float]] = {}
        if self.watcher == "watchdog" and not self.once:
            self._start_observer()  # before the first scan, so no file slips between the two
        first = self._scan()
        for path, st in first.items():
            if self.existing == "skip" or path in self.done:
                handed[path] = st.st_mtime_ns
            else:
                pending[path] = (st.st_size, st.st_mtime_ns, 1, time.monotonic())
        last_scan = time.monotonic()
        count = 0
        try:
            while not stop.is_set():
                now = time.monotonic()
                with self._lock:
                    events, self._events = self._events, set()
                    moved, self._moved = self._moved, set()
                scan = None
                if self._observer is None or now - last_scan >= self.rescan:
                    scan = self._scan()
                    last_scan = now
                    for gone in [p for p in handed if p not in scan]:
                        del handed[gone]  # the camera or an archiver removed it; forget it
                    candidates = scan.keys() | pending.keys()
                else:
                    candidates = events | pending.keys()
                ready: list[tuple[int, str, tuple[int, int]]] = []
                for path in candidates:
                    st = scan.get(path) if scan is not None else None
                    if st is None:
                        try:
                            st = os.stat(path)
                        except OSError:
                            pending.pop(path, None)
                            continue
                    key = (st.st_size, st.st_mtime_ns)
                    if handed.get(path) == st.st_mtime_ns:
                        continue
                    if path in moved and st.st_size > 0:  # renamed into place / closed by the writer: complete
                        pending.pop(path, None)
                        ready.append((st.st_mtime_ns, path, key))
                        continue
                    old = pending.get(path)
                    if old is None or (old[0], old[1]) != key:
                        pending[path] = (key[0], key[1], 1, now)
                        continue
                    looks, since = old[2] + 1, old[3]
                    # an empty file is handed over (to become an error record) only after a long quiet spell
                    wait = self.settle if key[0] > 0 else max(1.0, 4 * self.settle)
                    if looks >= 2 and now - since >= wait:
                        pending.pop(path)
                        ready.append((st.st_mtime_ns, path, key))
                    else:
                        pending[path] = (key[0], key[1], looks, since)
                for _, path, key in sorted(ready):
                    handed[path] = key[1]
                    yield Frame(self.spec, count, path, loader=_file_loader(path, channels, key, self.settle, reader=self.reader))
                    count += 1
                    if stop.is_set():
                        return
                if self.once and not pending and not ready:
                    return
                stop.wait(self.poll)
        finally:
            self.close()

    def close(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=2)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._observer = None


# -------------------------------------------------------------------------------------------
# video files and streams


class VideoSource(Source):
    """A video file or a stream through OpenCV ``VideoCapture`` (frame index as the id).

    Args:
        spec: a video file, a stream URL (``rtsp://``, ``http://`` …), a device index ``"0"`` or ``/dev/videoN``.
        live: a stream or device (default: guessed from ``spec``): reconnects when the stream
            drops and lets the station drop frames it cannot keep up with.
        pace: play a video file at its frame rate (as a camera would deliver it) instead of as
            fast as it decodes.
        reconnect: seconds between reconnection attempts of a live stream.
    """

    def __init__(self, spec: str, live: bool | None = None, pace: bool = False, reconnect: float = 2.0) -> None:
        super().__init__(spec)
        self.live = bool(live) if live is not None else (spec.lower().startswith(STREAM_SCHEMES) or spec.isdigit() or spec.startswith("/dev/"))
        self.pace = pace
        self.reconnect = reconnect
        if not self.live and not os.path.isfile(spec):
            raise SourceError(f"{spec}: video file not found")
        self._cap = self._open()

    def _open(self):
        import cv2

        cap = cv2.VideoCapture(int(self.spec) if self.spec.isdigit() else self.spec)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.spec}: OpenCV cannot open this video or stream (codec, URL or device?)")
        return cap

    def frames(self, channels: int, stop: threading.Event) -> Iterator[Frame]:
        import cv2

        cap = self._cap
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        start = time.perf_counter()
        index = 0
        try:
            while not stop.is_set():
                if cap is None or not cap.grab():
                    if not self.live:
                        return  # end of file
                    if cap is not None:
                        cap.release()
                    cap = self._cap = None
                    if stop.wait(self.reconnect):
                        return
                    try:
                        cap = self._cap = self._open()
                    except SourceError:
                        pass
                    continue
                arrival, stamp = time.perf_counter(), utc_now_iso()
                ok, image = cap.retrieve()
                frame = Frame(self.spec, index, None, arrival, stamp)
                if not ok or image is None:
                    frame.error = f"{self.spec}: frame {index} could not be decoded"
                else:
                    try:
                        frame.image = convert_frame(image, channels, "BGR")
                    except FrameError as exc:
                        frame.error = f"{self.spec}: frame {index}: {exc}"
                yield frame
                index += 1
                if self.pace and fps > 0 and not self.live:
                    wait = start + index / fps - time.perf_counter()
                    if wait > 0 and stop.wait(wait):
                        return
        finally:
            self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


# -------------------------------------------------------------------------------------------
# GenICam cameras (GigE Vision / USB3 Vision) through harvesters


def find_cti_files(cti: str | os.PathLike | None = None) -> list[str]:
    """GenTL producer files: ``cti`` (a .cti file or a folder of them), else ``GENICAM_GENTL64_PATH``."""
    entries: list[str]
    if cti:
        entries = [os.fspath(cti)]
    else:
        entries = [e for e in os.environ.get("GENICAM_GENTL64_PATH", "").split(os.pathsep) if e.strip()]
    found: list[str] = []
    for entry in entries:
        if os.path.isfile(entry) and entry.lower().endswith(".cti"):
            found.append(entry)
        elif os.path.isdir(entry):
            found.extend(sorted(str(p) for p in Path(entry).iterdir() if p.suffix.lower() == ".cti" and p.is_file()))
        elif cti:
            raise SourceError(f"--cti {entry}: not a .cti GenTL producer file nor a folder holding one")
    return found


# GenICam pixel formats → (dtype, bit depth, channels, OpenCV conversion to RGB or None)
_BAYER = {"RG": "RGGB", "GR": "GRBG", "GB": "GBRG", "BG": "BGGR"}


def convert_genicam(data: np.ndarray, width: int, height: int, pixel_format: str, channels: int) -> np.ndarray:
    """One GenICam buffer component → uint8 (H, W, ``channels``).

    Handles Mono8/10/12/14/16, RGB8/BGR8/RGBa8/BGRa8 and Bayer{RG,GR,GB,BG}8/10/12/16 (unpacked).

    Raises:
        FrameError: a packed or unknown pixel format, or a buffer of the wrong size.
    """
    import cv2

    fmt = str(pixel_format)
    m = re.fullmatch(r"(Mono|Bayer(RG|GR|GB|BG)|RGB|BGR|RGBa|BGRa)(\d+)", fmt)
    if not m:
        raise FrameError(f"pixel format {fmt} is not supported (use Mono8/12/16, RGB8, BGR8 or BayerXX8/12/16, unpacked)")
    kind, bayer, bits = m.group(1), m.group(2), int(m.group(3))
    n = 3 if kind in ("RGB", "BGR") else 4 if kind in ("RGBa", "BGRa") else 1
    a = np.asarray(data).reshape(-1)
    if bits > 8 and a.dtype == np.uint8:
        a = a.view(np.uint16)
    if a.size != width * height * n:
        raise FrameError(f"{fmt} buffer holds {a.size} values, expected {width}x{height}x{n}")
    a = a.reshape(height, width, n) if n > 1 else a.reshape(height, width)
    if bits > 8:
        a = (a.astype(np.uint32) >> (bits - 8)).astype(np.uint8)
    if bayer:
        rgb = cv2.cvtColor(np.ascontiguousarray(a), getattr(cv2, f"COLOR_Bayer{_BAYER[bayer]}2RGB"))
        return convert_frame(rgb, channels, "RGB")
    return convert_frame(a, channels, "BGR" if kind.startswith("BGR") else "RGB")


class GenICamSource(Source):
    """A GigE Vision / USB3 Vision camera through harvesters and a GenTL producer (``.cti``).

    ``genicam://`` opens the first camera found, ``genicam://SERIAL`` the one with that serial
    number. The camera runs with its own settings (trigger, exposure, pixel format: set them with
    the vendor's tool or its user set); each buffer becomes one frame.

    Raises:
        SourceError: no GenTL producer configured, harvesters not installed, no such camera.
    """

    live = True

    def __init__(self, spec: str, cti: str | os.PathLike | None = None, timeout: float = 0.5) -> None:
        super().__init__(spec)
        self.serial = spec.split("://", 1)[1].strip("/") if "://" in spec else ""
        self.timeout = timeout
        self.cti_files = find_cti_files(cti)
        if not self.cti_files:
            raise SourceError(
                "GenICam source: no GenTL producer (.cti) configured; pass --cti /path/to/producer.cti "
                "(or a folder of them) or set GENICAM_GENTL64_PATH to the folder of your camera vendor's "
                "producer (installed with its SDK)"
            )
        try:
            from harvesters.core import Harvester
        except ImportError as exc:
            raise SourceError(
                f"GenICam source needs the optional 'harvesters' package ({exc}); "
                "install it with: pip install 'lineside[camera]'"
            ) from None
        self._h = Harvester()
        self._ia = None
        try:
            for f in self.cti_files:
                self._h.add_file(f)
            self._h.update()
            infos = list(self._h.device_info_list)
            if not infos:
                raise SourceError(f"GenICam source: no camera found through {', '.join(self.cti_files)}")
            if self.serial:
                match = [d for d in infos if str(getattr(d, "serial_number", "")) == self.serial]
                if not match:
                    seen = ", ".join(str(getattr(d, "serial_number", "?")) for d in infos)
                    raise SourceError(f"GenICam source: no camera with serial {self.serial} (found: {seen})")
                self.device = match[0]
            else:
                self.device = infos[0]
            self._ia = self._h.create(self.device)
        except SourceError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - GenTL errors come in many kinds
            self.close()
            raise SourceError(f"GenICam source: cannot open the camera ({type(exc).__name__}: {exc})") from None

    def describe(self) -> str:
        d = self.device
        return f"genicam {getattr(d, 'vendor', '')} {getattr(d, 'model', '')} serial {getattr(d, 'serial_number', '?')}".replace("  ", " ")

    def _fetch(self):
        ia = self._ia
        if hasattr(ia, "try_fetch"):  # harvesters >= 1.4: None on timeout
            return ia.try_fetch(timeout=self.timeout)
        try:
            return ia.fetch(timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - genicam.gentl.TimeoutException
            if "Timeout" in type(exc).__name__:
                return None
            raise

    def frames(self, channels: int, stop: threading.Event) -> Iterator[Frame]:
        self._ia.start()
        index = 0
        try:
            while not stop.is_set():
                buffer = self._fetch()
                if buffer is None:
                    continue
                frame = Frame(self.spec, index)
                try:
                    with buffer:
                        c = buffer.payload.components[0]
                        frame.image = convert_genicam(c.data, int(c.width), int(c.height), c.data_format, channels)
                except FrameError as exc:
                    frame.error = f"camera frame {index}: {exc}"
                except Exception as exc:  # noqa: BLE001 - an incomplete or odd buffer must not stop the line
                    frame.error = f"camera frame {index}: {type(exc).__name__}: {exc}"
                yield frame
                index += 1
        finally:
            self.close()

    def close(self) -> None:
        ia, self._ia = self._ia, None
        if ia is not None:
            for step in ("stop", "destroy"):
                try:
                    getattr(ia, step)()
                except Exception:  # noqa: BLE001
                    pass
        h = getattr(self, "_h", None)
        if h is not None:
            try:
                h.reset()
            except Exception:  # noqa: BLE001
                pass
            self._h = None


# -------------------------------------------------------------------------------------------


def open_source(
    spec: str,
    *,
    existing: str = "process",
    once: bool = False,
    poll: float = 0.1,
    settle: float = 0.25,
    use_watchdog: bool | None = None,
    done: set[str] | None = None,
    cti: str | None = None,
    pace: bool = False,
) -> Source:
    """The source for ``spec``: ``genicam://[serial]``, a stream URL, a folder, a video file, an image file or a glob."""
    spec = str(spec)
    low = spec.lower()
    if low.startswith("genicam://"):
        return GenICamSource(spec, cti=cti)
    if low.startswith(STREAM_SCHEMES) or spec.isdigit() or spec.startswith("/dev/video"):
        return VideoSource(spec, live=True)
    if os.path.isdir(spec):
        return FolderSource(spec, existing=existing, once=once, poll=poll, settle=settle, use_watchdog=use_watchdog, done=done)
    if os.path.isfile(spec):
        if low.endswith(VIDEO_EXTENSIONS):
            return VideoSource(spec, live=False, pace=pace)
        return GlobSource(spec, [spec])
    if any(ch in spec for ch in "*?["):
        return GlobSource(spec)
    raise SourceError(f"{spec}: no such folder, file or stream (expected DIR, GLOB, VIDEO, rtsp://… or genicam://[serial])")
