"""fedfill's shared core: data, models, the upload codec, the message contract and the job
interface that the server, the clients, the strategies and the generator all build on.
It knows no role: nothing here imports server/, client/, strategies/, generation/ or deploy/."""

__version__ = "0.1.0"
