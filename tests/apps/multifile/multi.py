import mctl
from helpers import double
from shapes.area import square_area

app = mctl.App("multifile")


@app.function()
def compute(x: int):
    return double(x), square_area(x)
