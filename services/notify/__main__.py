from chassis.service import main
from services.notify.server import definition

main(definition)
