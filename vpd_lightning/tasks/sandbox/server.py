"""The sandboxed half of the judge protocol (read as text by ``judge.py`` and run as the sandboxed
program; never imported).

It runs the response's code, says whether the entry point exists, then answers calls: each request
carries the arguments (``marshal`` data from the judge), each reply the return value as plain data
(``wire.py``), or the exception the call raised, or why the value cannot be sent. It decides
nothing: the tests, the expected values and the verdict stay with the judge, so nothing the response
does in this process (patching builtins, reading file descriptors, walking frames or ``gc``) can
make a test pass.
"""

import builtins
import marshal
import os
import sys


def main():
    requests, replies = int(sys.argv[-2]), int(sys.argv[-1])
    files = __files__  # noqa: F821 (given by the sandbox, in memory)
    wire = type(sys)("wire")
    exec(compile(files["wire.py"], "wire.py", "exec"), wire.__dict__)
    chunks, entry_point = marshal.loads(files["response.marshal"])
    os.remove("wire.py")
    os.remove("response.marshal")
    response_name = chunks[-1][0]  # line numbers are shown for the response only

    def send(data):
        try:  # noqa: SIM105 (what the response printed reaches the log, even if it never exits)
            sys.stdout.flush()
        except BaseException:
            pass
        view = memoryview(data)
        while view:
            view = view[os.write(replies, view) :]

    def receive_exactly(size):
        data = bytearray()
        while len(data) < size:
            chunk = os.read(requests, size - len(data))
            if not chunk:
                return None
            data.extend(chunk)
        return bytes(data)

    def describe(exc):
        import traceback

        try:
            message = str(exc)[:2000]
        except BaseException:
            message = "<unprintable>"
        frames = traceback.extract_tb(exc.__traceback__)
        lines = [f.lineno for f in frames if f.filename == response_name]
        return {
            "error_type": type(exc).__name__,
            "message": message,
            "lineno": lines[-1] if lines else None,
        }

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for name, source in chunks:
        try:
            code = compile(source, name, "exec")
        except SyntaxError as exc:
            send(
                wire.message(
                    kind="error", error_type="SyntaxError", message=str(exc.msg), lineno=exc.lineno
                )
            )
            return
        try:
            exec(code, namespace)
        except BaseException as exc:
            send(wire.message(kind="error", **describe(exc)))
            return
    function = namespace.get(entry_point)
    send(wire.message(kind="ready", callable=callable(function)))
    while True:
        header = receive_exactly(wire.HEADER_SIZE)
        body = header and receive_exactly(wire.size_of(header))
        if body is None:
            return
        args, kwargs = marshal.loads(body)
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:
            send(wire.message(kind="raised", **describe(exc)))
            continue
        try:
            reply = wire.message(kind="returned", value=result)
        except (wire.WireError, RecursionError, MemoryError) as exc:
            why = str(exc)[:200]
            send(wire.message(kind="bad_return", type=type(result).__name__, why=why))
            continue
        send(reply)


main()
