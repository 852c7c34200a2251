"""The training core: everything a trial does, with no Ray import.

    contract.TrialConfig        what a trial is asked to do (typed; built by trainables/trial.py)
    layout                      where a search keeps its files (every name in one place)
    checkpoint.TrialCheckpoint  one epoch's state: saved by training, read by resume, export and report
    model                       building a family's model for the data, its outputs and losses
    engine.Engine               data loaders, model, optimizer and schedule of one trial; one epoch at a time
    session.Session             what the core needs from whoever runs it (rank, device, report, checkpoint);
                                LocalSession runs it in-process (tests, tools); trainables/trial.py has the
                                Ray Tune (one worker) and Ray Train (DDP) sessions
    loop.train_trial            the epochs of one trial: train, validate, report, checkpoint, NaN/Inf stop
"""
