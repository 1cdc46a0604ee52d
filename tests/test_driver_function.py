"""driver.DriverFunction's argument marshalling, on the CPU: a stand-in for libcuda records what cuLaunchKernel is
handed, and the test reads every parameter back through its pointer, as the driver does. The storage is reused
between launches, so each launch must carry its own values (and a wrong count or struct size is refused)."""

from __future__ import annotations

import ctypes

import pytest

from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda.driver import DriverFunction

CODES = ["128s", "P", "i", "f", "q"]
READERS = {"P": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float, "q": ctypes.c_longlong}


class FakeDriver:
    """libcuda's calls that DriverFunction makes; cuLaunchKernel decodes its kernelParams at once."""

    def __init__(self):
        self.launches = []

        def launch(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            values = []
            for i, code in enumerate(CODES):
                if code.endswith("s"):
                    values.append(ctypes.string_at(params[i], int(code[:-1])))
                else:
                    values.append(ctypes.cast(params[i], ctypes.POINTER(READERS[code])).contents.value)
            self.launches.append(((gx, gy, gz), (bx, by, bz), shared, stream, values))
            return 0

        self.cuLaunchKernel = launch

    def cuModuleLoad(self, module, path):
        return 0

    def cuModuleGetFunction(self, function, module, name):
        return 0


class Stream:
    handle = 0x5000


def test_each_launch_hands_the_driver_its_own_values():
    driver = FakeDriver()
    function = DriverFunction("unused.cubin", "kernel", CODES, lib=driver)
    first = (bytes(range(128)), 0xDEAD0000, -7, 0.5, 2**40)
    second = (bytes(reversed(range(128))), 0xBEEF0000, 123, -2.25, -3)
    function.prepared_async_call((3, 2, 1), (256, 1, 1), Stream(), *first, shared_size=4096)
    function.prepared_async_call((1, 1, 1), (128, 1, 1), Stream(), *second)
    assert driver.launches[0] == ((3, 2, 1), (256, 1, 1), 4096, Stream.handle, list(first))
    assert driver.launches[1] == ((1, 1, 1), (128, 1, 1), 0, Stream.handle, list(second))


@pytest.mark.parametrize("args, message", [
    ((bytes(128), 1, 2, 3.0), "4 arguments for 5 parameters"),
    ((bytes(127), 1, 2, 3.0, 4), "127 bytes for a 128-byte parameter"),
])
def test_a_wrong_argument_list_is_refused_before_the_launch(args, message):
    driver = FakeDriver()
    function = DriverFunction("unused.cubin", "kernel", CODES, lib=driver)
    with pytest.raises(DeviceError, match=message):
        function.prepared_async_call((1, 1, 1), (32, 1, 1), Stream(), *args)
    assert driver.launches == []
