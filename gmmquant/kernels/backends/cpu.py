from . import reference
def run(plan):
    return reference.run(plan)
