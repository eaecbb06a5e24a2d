"""GPTQ (and AWQ) in two backends: GPTQModel's layouts (gptqmodel.py) and quantloop's solver on llama.cpp's grids
(grid.py); see README.md."""
